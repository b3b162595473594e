"""From continuous embeddings to readable tokens (docs/method.md section 4).

Three projectors share one incremental decode (`decode`): the LM reads `lm_prefix` and the tokens
chosen so far through its KV cache, one batched step per position, and a projector-specific rule picks
each row's next token from the final hidden state.

- nearest: the allowed token with the highest cosine to the embedding; ignores the LM.
- topk_lm (the paper's): among the top-k allowed tokens by cosine, the one the LM likes best.
- matching_lm and matching_lm_exact (gradmm.matching_projection): also score candidates by the change
  of the set's discrete matching loss.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from gradmm.matching_context import Projected
from gradmm.models import LM

_WORD = re.compile(r" [A-Za-z]+")
_PUNCTUATION = {".", ",", "!", "?", "'s", "'t", " -", ":"}


@functools.lru_cache(maxsize=8)
def _allowed_ids(tokenizer, min_zipf: float) -> tuple[int, ...]:
    from wordfreq import zipf_frequency

    special = set(tokenizer.all_special_ids)
    allowed = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        piece = tokenizer.decode([token_id])
        if piece in _PUNCTUATION:
            allowed.append(token_id)
        # A leading space marks a word start; wordfreq rejects fragments such as " mitig".
        elif _WORD.fullmatch(piece) and zipf_frequency(piece[1:].lower(), "en") >= min_zipf:
            allowed.append(token_id)
    return tuple(allowed)


def allowed_vocabulary(tokenizer, vocab_rows: int, min_zipf: float = 3.0) -> torch.Tensor:
    """Boolean mask over embedding rows: whole English words (with their leading space) and basic
    punctuation. Special ids and rows past the tokenizer (unused padding rows) are never allowed."""
    mask = torch.zeros(vocab_rows, dtype=torch.bool)
    mask[list(_allowed_ids(tokenizer, min_zipf))] = True
    return mask


def random_allowed_tokens(allowed: torch.Tensor, n_rows: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """n_rows x length tokens drawn uniformly from the allowed vocabulary (on the CPU)."""
    allowed_ids = allowed.cpu().nonzero().squeeze(-1)
    return allowed_ids[torch.randint(len(allowed_ids), (n_rows, length), generator=generator)]


ChooseFn = Callable[[int, torch.Tensor], torch.Tensor]


@torch.no_grad()
def decode(
    lm: LM, prefix_ids: list[int], n_rows: int, length: int, choose: ChooseFn, *, reuse_cache: bool = True
) -> torch.Tensor:
    """Left-to-right decode: `choose(t, hidden)` returns each row's token at t from the final hidden
    state (rows x d) that predicts it. The output layer is left to `choose`: a rule that looks at a
    few candidates scores those alone, which on SmolLM2 saves a third of every step.

    reuse_cache=False re-runs the model over the whole prefix at every position (the reference code's
    way, same tokens): kept as the baseline the benchmark compares the KV-cached decode against.
    """
    ids = torch.tensor([prefix_ids] * n_rows, device=lm.device)
    cache = DynamicCache(config=lm.model.config) if reuse_cache else None
    step = ids
    tokens = torch.empty(n_rows, length, dtype=torch.long, device=lm.device)
    for t in range(length):
        with lm.autocast():
            hidden = lm.decoder(input_ids=step, cache=cache, use_cache=reuse_cache).last_hidden_state[:, -1]
        tokens[:, t] = choose(t, hidden)
        step = tokens[:, t : t + 1] if reuse_cache else torch.cat([ids, tokens[:, : t + 1]], dim=1)
    return tokens


@torch.no_grad()
def cosine_topk_ids(lm: LM, points: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """B x L x k ids of the k allowed tokens closest in cosine to each point (B x L x d)."""
    # Against the allowed rows only: on SmolLM2 about half the vocabulary, and of the similarity
    # matmul, which is the projection's largest after the decode itself.
    allowed_ids = allowed.to(lm.input_embeddings.device).nonzero().squeeze(-1)
    emb = lm.input_embeddings[allowed_ids].float()
    emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sims = (points.float() / points.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ emb.T
    return allowed_ids[sims.topk(min(k, len(allowed_ids)), dim=-1).indices]


def cosine_topk_mask(lm: LM, points: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """The same as a B x L x V mask."""
    top = cosine_topk_ids(lm, points, allowed, k)
    mask = torch.zeros(*points.shape[:2], lm.input_embeddings.shape[0], dtype=torch.bool, device=top.device)
    return mask.scatter_(-1, top, True)


def project_nearest(lm: LM, points: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return cosine_topk_ids(lm, points, allowed, 1)[..., 0]


def project_topk_lm(
    lm: LM,
    points: torch.Tensor,
    allowed: torch.Tensor,
    topk: int,
    prefix_ids: list[int],
    *,
    reuse_cache: bool = True,
):
    pool = cosine_topk_ids(lm, points, allowed, topk)  # B x L x k
    weight, bias = lm.output_weight, lm.output_bias

    def choose(t: int, hidden: torch.Tensor) -> torch.Tensor:
        # The LM's favourite among the k candidates: their logits alone, whose argmax is the
        # log-probabilities' (the normaliser is shared), instead of the whole vocabulary's.
        candidates = pool[:, t]
        with lm.autocast():
            logits = (weight[candidates] @ hidden[:, :, None]).squeeze(-1)
            if bias is not None:
                logits = logits + bias[candidates]
        return candidates.gather(-1, logits.float().argmax(dim=-1, keepdim=True)).squeeze(-1)

    return decode(lm, prefix_ids, points.shape[0], points.shape[1], choose, reuse_cache=reuse_cache)


@dataclass(frozen=True)
class Nearest:
    """The nearest allowed token by cosine; no LM."""

    def __call__(self, lm, points, current, allowed, ctx, prefix_ids):
        return Projected(project_nearest(lm, points, allowed))


@dataclass(frozen=True)
class TopkLM:
    """The paper's: among the top-k allowed tokens by cosine, the LM's favourite."""

    topk: int

    def __call__(self, lm, points, current, allowed, ctx, prefix_ids):
        return Projected(project_topk_lm(lm, points, allowed, self.topk, prefix_ids))


def sample_sequences(
    lm: LM,
    n_rows: int,
    length: int,
    allowed: torch.Tensor,
    prefix_ids: list[int],
    *,
    temperature: float,
    lm_topk: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """LM samples restricted to the allowed vocabulary: a readable starting point for ADMM."""
    allowed = allowed.to(lm.device)

    def choose(t: int, hidden: torch.Tensor) -> torch.Tensor:
        logits = lm.next_token_logprobs(hidden).masked_fill(~allowed, -float("inf")) / temperature
        threshold = logits.topk(lm_topk, dim=-1).values[:, -1:]
        probs = torch.softmax(logits.masked_fill(logits < threshold, -float("inf")), dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(lm.device)

    return decode(lm, prefix_ids, n_rows, length, choose)
