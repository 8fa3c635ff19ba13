"""Padding-free batches: the sequences of a micro-batch packed into one row.

A right-padded batch [B, T] becomes one row [1, L] of its real tokens (L = sum of the lengths),
with position_ids restarting at 0 for every sequence, so rotary/absolute positions are those of
the padded batch. Attention must not cross sequence boundaries. transformers 5 offers two routes:
attention_mask=None plus restarting position_ids, from which it builds a block-diagonal [L, L]
mask for sdpa/eager/flex (dense work and memory in L^2, more than the padded batch does) or runs
flash-attention's varlen kernel (CUDA, the flash-attn package). Here the attention is an
implementation registered through transformers' AttentionInterface: when the call carries the
batch's attention plan it gathers the row's sequences into a padded batch for one masked sdpa call
and scatters the result back, and is plain sdpa otherwise (padded batches, generation). Attention
costs S * T_max^2 (length-grouped batches keep T_max close to each T_i), never the L^2 of one
dense mask; the linear layers, most of a step, run on the real tokens only.

The selected positions keep the padded batch's row-major order, so every loss sees the same
[N] positions in the same order either way.

Pairs (DPO's chosen and rejected) can also store their common prompt once (pack_shared, "prefix
sharing"): the prompt's tokens pass through the linear layers once per pair instead of twice;
attention gathers them into both sequences, so a response attends to the prompt and to itself only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from aligndistil_cli.data.encode import Batch
from aligndistil_cli.parallel import fsdp

VARLEN = "aligndistil_varlen_sdpa"
_PACKABLE = ("sdpa", "eager", VARLEN)


def varlen_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        attention_plan=None, **kwargs):
    """transformers attention function: attention within each group of a packed row, else plain sdpa.

    query/key/value [1, heads, L, d]; attention_plan (index [S, T_max], take [L], mask
    [S, 1, T_max, T_max]) from the batch (PackedBatch.model_inputs): the row's sequences are
    gathered into one [S, heads, T_max, d] batch (a prefix that sequences share is gathered into
    each of them) for a single causal sdpa call, and each token takes its output from one slot
    (take, into the flattened [S * T_max]). One kernel per layer rather than one per sequence,
    which on small models cost more in calls than packing saved. Only attention sees the padding
    and the shared prefixes twice (S * T_max^2 scores); every linear layer runs on the L tokens of
    the row once. Returns ([1, L, heads, d], None) like sdpa_attention_forward.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    index, take, mask = attention_plan

    def batched(x: torch.Tensor) -> torch.Tensor:  # [1, h, L, d] -> [S, h, T_max, d]
        return x[0][:, index].transpose(0, 1)

    out = sdpa_attention_forward(module, batched(query), batched(key), batched(value), mask, dropout, scaling,
                                 **kwargs)[0]
    return out.flatten(0, 1)[take].unsqueeze(0), None


def _plan(index: torch.Tensor, lengths: torch.Tensor, take: torch.Tensor):
    """(index, take, causal mask over each sequence's valid keys [S, 1, T_max, T_max]) for varlen_sdpa_forward."""
    steps = torch.arange(index.shape[1], device=index.device)
    valid = steps[None, :] < lengths[:, None]
    causal = steps[:, None] >= steps[None, :]
    return index, take, (causal[None] & valid[:, None, :]).unsqueeze(1)


@functools.lru_cache(maxsize=1)
def _gather_plan(bounds: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plan of a row of whole sequences with bounds (0, e_1, ..., L): index [S, T_max] into the row
    (a padded slot repeats the sequence's first token), and each token's own slot.

    The probe and gradient checkpointing's second forward come here with the same bounds again: built once."""
    starts = torch.tensor(bounds[:-1], device=device)
    lengths = torch.tensor(bounds[1:], device=device) - starts
    steps = torch.arange(int(lengths.max()), device=device)
    valid = steps[None, :] < lengths[:, None]
    return _plan(starts[:, None] + steps[None, :] * valid, lengths, valid.flatten().nonzero().squeeze(1))


def register() -> None:
    """Make VARLEN a valid attn_implementation (padded batches get sdpa's own masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_sdpa_forward)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)


@dataclass
class PackedBatch:
    """One row of packed token groups. input_ids, position_ids, loss_mask, targets, seq_index: [1, L].

    A group is one sequence (pack), or several sequences that store their common prefix once
    (pack_shared); cu_seqlens [G + 1] (host) are the groups' bounds. seq_index[0, t] is the
    sequence (0..num_seqs-1) of token t (a shared prefix, which holds no loss position, is
    labelled with its group's first sequence). plan: the attention plan of a row with shared
    prefixes (pack_shared); None for whole sequences, whose plan follows from cu_seqlens.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor
    targets: torch.Tensor
    seq_index: torch.Tensor
    cu_seqlens: torch.Tensor
    num_seqs: int
    plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_positions(self) -> torch.Tensor:
        """[S] response positions per sequence."""
        return torch.zeros(self.num_seqs, dtype=torch.long, device=self.loss_mask.device).index_add_(
            0, self.seq_index[0], self.loss_mask[0].long())

    def attention_plan(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """varlen_sdpa_forward's (index, take, mask): each sequence attends causally to its own tokens,
        a shared prefix included, and never to another sequence's."""
        return self.plan or _gather_plan(tuple(self.cu_seqlens.tolist()), self.input_ids.device)

    def model_inputs(self) -> dict:
        """Keyword arguments of the base model's forward (a ones mask: transformers builds no [L, L] mask)."""
        return {"input_ids": self.input_ids, "attention_mask": torch.ones_like(self.input_ids),
                "position_ids": self.position_ids, "attention_plan": self.attention_plan()}

    def to(self, device) -> PackedBatch:
        moved = (t.to(device) for t in (self.input_ids, self.position_ids, self.loss_mask, self.targets,
                                         self.seq_index))
        return PackedBatch(*moved, self.cu_seqlens, self.num_seqs,
                           None if self.plan is None else tuple(t.to(device) for t in self.plan))


def pack(batch: Batch) -> PackedBatch:
    """The real tokens of a right-padded batch, concatenated row by row into one row."""
    real = batch.attention_mask.bool()
    lengths = real.sum(dim=1)
    rows = torch.arange(real.shape[0], device=real.device).unsqueeze(1).expand_as(real)
    starts = torch.cumsum(lengths, 0) - lengths
    seq_index = rows[real]
    position_ids = torch.arange(seq_index.shape[0], device=real.device) - starts[seq_index]
    cu = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).cpu()
    return PackedBatch(batch.input_ids[real][None], position_ids[None], batch.loss_mask[real][None],
                       batch.targets[real][None], seq_index[None], cu, real.shape[0])


def shared_prefix(tokens: list[list[int]], limits: list[int]) -> int:
    """The length of the longest common prefix of the rows' tokens, at most each row's limit."""
    n = min(limits)
    for i in range(n):
        if any(row[i] != tokens[0][i] for row in tokens[1:]):
            return i
    return n


def pack_shared(batch: Batch, groups: list[list[int]]) -> PackedBatch:
    """The real tokens of a right-padded batch in one row, each group of rows storing its common prefix once.

    groups: row indices of the sequences that may share a prefix (DPO: a pair's chosen and rejected,
    which share the prompt). The prefix shared is the rows' longest common prefix, cut before each
    row's first loss position: the last prompt token, whose output predicts each response's first
    token, stays in every row, so the losses read the same [N] positions as the padded batch does.
    Attention gathers the prefix into each of its sequences (PackedBatch.attention_plan), so every
    position's hidden state is the padded batch's; the linear layers run on the prefix once. Only
    the order of the selected positions changes (group by group); the losses group them by
    sequence_ids.
    """
    lengths = batch.attention_mask.sum(dim=1).tolist()
    first_loss = batch.loss_mask.int().argmax(dim=1).tolist()  # within each row's length (0: no loss position)
    ids = batch.input_ids.tolist()
    rows, cols, bounds = [], [], [0]
    members: list[list[int]] = []  # per sequence slot: the places of its tokens in the row, prefix included
    owner: list[tuple[int, int]] = []  # per token of the row: the (sequence slot, step) its attention output is
    for group in groups:
        shared = shared_prefix([ids[r] for r in group], [first_loss[r] for r in group])
        prefix = list(range(len(rows), len(rows) + shared))
        rows += [group[0]] * shared
        cols += range(shared)
        owner += [(len(members), t) for t in range(shared)]
        for r in group:
            own = range(len(rows), len(rows) + lengths[r] - shared)
            owner += [(len(members), t) for t in range(shared, lengths[r])]
            members.append(prefix + list(own))
            rows += [r] * len(own)
            cols += range(shared, lengths[r])
        bounds.append(len(rows))
    device = batch.input_ids.device
    width = max(len(m) for m in members)
    index = torch.tensor([m + [m[0]] * (width - len(m)) for m in members], device=device)
    take = torch.tensor([s * width + t for s, t in owner], device=device)
    plan = _plan(index, torch.tensor([len(m) for m in members], device=device), take)
    r, c = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    return PackedBatch(batch.input_ids[r, c][None], c[None], batch.loss_mask[r, c][None], batch.targets[r, c][None],
                       r[None], torch.tensor(bounds), batch.input_ids.shape[0], plan)


def pair_groups(batch: Batch) -> list[list[int]]:
    """The pairs of a batch of n chosen rows followed by their n rejected rows (dpo.pair_logps' layout)."""
    n = batch.input_ids.shape[0] // 2
    return [[i, n + i] for i in range(n)]


def unsupported_reason(model) -> str | None:
    """Why this model cannot run packed rows, or None. The probe in enable() checks the rest."""
    cfg = model.config
    if not fsdp.model_class(model).__module__.startswith("transformers."):
        return "its modelling code is not part of transformers"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in _PACKABLE:
        return f"attention {impl!r} has no packed route here (sdpa or eager have)"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "its attention soft-caps logits, which sdpa does not"
    layer_types = getattr(cfg, "layer_types", None) or []
    if (getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None)) or \
            any(t != "full_attention" for t in layer_types):
        return "it has sliding-window or other non-full attention layers"
    return None


@torch.no_grad()
def probe(model, tol: float = 1e-4) -> str | None:
    """Run two short sequences packed and apart; None if their hidden states agree, else why not."""
    base = getattr(model, model.base_model_prefix)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    a, b = torch.arange(3, 10, device=device) % vocab, torch.arange(11, 16, device=device) % vocab
    was_training = model.training
    model.eval()
    try:
        apart = [base(input_ids=x[None], use_cache=False).last_hidden_state[0] for x in (a, b)]
        padded = torch.stack([a, torch.cat([b, b.new_zeros(2)])])
        mask = torch.ones_like(padded)
        mask[1, b.shape[0]:] = 0
        packed = pack(Batch(padded, mask, mask.bool(), padded))
        together = base(**packed.model_inputs(), use_cache=False).last_hidden_state[0]
    finally:
        model.train(was_training)
    err = (together - torch.cat(apart)).abs().max().item()
    scale = max(torch.cat(apart).abs().max().item(), 1.0)
    return None if err <= tol * scale else f"packed hidden states differ from separate ones by {err:.2e}"


def enable(model, wanted: bool, desc: str) -> bool:
    """Switch model to padding-free attention when wanted and possible; else say why in one line."""
    from aligndistil_cli.core.console import stderr
    from aligndistil_cli.parallel.fsdp import unwrap

    if not wanted:
        return False
    inner = unwrap(model)
    reason = unsupported_reason(inner)
    if reason is None:
        register()
        previous = inner.config._attn_implementation
        inner.set_attn_implementation(VARLEN)
        reason = fsdp.redirect(model, probe, inner)  # a sharded model's parameters are gathered around it
        fsdp.reshard(model)
        if reason is not None:
            inner.set_attn_implementation(previous)
    if reason is not None:
        stderr.print(f"{desc}: padding-free batches off ({reason}); using padded batches", markup=False,
                     highlight=False, soft_wrap=True)
        return False
    return True


# Below this fraction of padded slots a micro-batch stays padded: on the toy SFT batches (1.6% padding
# after length grouping) a packed step cost 1.05x a padded one (packing's gathers and index work), so
# packing only pays where it removes more work than that (README, "Padding-free batches").
MIN_PADDING = 0.1


def padding_fraction(batch: Batch) -> float:
    """The share of a padded batch's [B, T] slots that are padding."""
    return 1.0 - float(batch.attention_mask.sum()) / batch.attention_mask.numel()


def collate_for(packed: bool, min_padding: float = 0.0, pairs: bool = False):
    """Batch -> Batch or PackedBatch, as the run was set up: packed when packing removes at least
    min_padding of the padded batch's [B, T] slots (0: always). The losses take either, with the same result.

    pairs (a batch of n chosen rows, then their n rejected rows): each pair's prompt is stored once
    (pack_shared), which removes the prompt's tokens as well as the padding. Its positions come
    group by group, not in the padded batch's row-major order: only for losses that sum positions
    by sequence_ids (DPO), never for per-position teacher fields (distill).
    """
    if not packed:
        return lambda batch: batch
    if not pairs:
        return lambda batch: pack(batch) if padding_fraction(batch) >= min_padding else batch

    def shared(batch: Batch):
        out = pack_shared(batch, pair_groups(batch))
        return out if 1.0 - out.input_ids.shape[1] / batch.input_ids.numel() >= min_padding else batch

    return shared
