"""The AlignDistil teacher: composing it from the DPO / reverse-DPO / reference logits, its safetensors cache (writer and reader), and sampling from it."""
