"""The AlignDistil teacher: composing it from the DPO / reverse-DPO / reference logits, live teachers,
its safetensors cache (writer and reader), the distillation objective, the health check, evaluating and
sampling it."""
