"""Typed config schemas, registered in Hydra's ConfigStore.

Every YAML file under conf/ merges into these dataclasses, so an unknown key or a wrong type fails at
composition. Rules a type cannot express live in gradmm.config.validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from gradmm.runs.identity import run_id


@dataclass
class TaskConfig:
    name: str = MISSING
    # Folder under paths.data_dir (and the default hub dataset) holding the splits.
    data_name: str = MISSING
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    # A commit, tag or branch of the hub dataset. Unpinned, the job is still named after the content it
    # read (gradmm.runs.identity), so a changed hub dataset is another job, but a rerun may read new data.
    hub_revision: Optional[str] = None
    label_names: list[str] = MISSING
    # Source label ids kept, in the order of label_names; None keeps all, unchanged.
    source_labels: Optional[list[int]] = None
    prompt: str = MISSING
    label_words: list[str] = MISSING
    # Context that the LM reads before a synthetic text when scoring its readability; never part of
    # the classifier's input.
    lm_prefix: str = "\n"
    # Split names as the hub dataset spells them, where they differ from the local files'.
    hub_splits: dict[str, str] = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "validation"
    max_text_tokens: int = 128


@dataclass
class ModelConfig:
    name: str = MISSING
    # gguf_package: a GGUF file shipped inside an installed Python package; hub: from_pretrained;
    # tiny: random weights from the fields below, with the tokenizer of `package` (or `hub_id`).
    source: str = MISSING
    package: Optional[str] = None
    gguf_file: Optional[str] = None
    hub_id: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: Optional[str] = None
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 64
    tie_word_embeddings: bool = True
    init_seed: int = 0
    # Speed options, for CUDA: torch.compile of the transformer, and autocast of its matmuls to
    # bfloat16/float16 (null: off; ignored off CUDA) with float32 weights (model.dtype=float32).
    compile: bool = False
    autocast: Optional[str] = None
    # The linear layers whose gradient carries the classes on this model, as regular expressions over
    # module names: what matching=block and matching=lora_block match. Measured per model with
    # experiments/class_signal.py (docs/method.md section 11); unmeasured models name their middle block.
    class_signal_modules: list[str] = field(default_factory=list)


@dataclass
class AdmmConfig:
    rho: float = 0.5
    outer_steps: int = 2
    inner_steps: int = 10
    lr: float = 0.008
    grad_clip: float = 1.0
    # End a round after this many outer steps in a row that lower no group's best discrete matching
    # loss (null: run every outer step).
    patience: Optional[int] = 1


@dataclass
class ProjectorConfig:
    # The class that projects (gradmm.method.projectors, gradmm.method.projectors), built with the settings below
    # that it declares.
    _target_: str = "gradmm.method.projectors.MatchingLM"
    name: str = "matching_lm"
    topk: int = 200
    # matching_lm(_exact): how many of the LM's most likely next tokens may be chosen, and how many nats
    # one unit of matching-loss decrease is worth; matching_lm: how many single-token swaps per row are
    # checked exactly; matching_lm_exact: how many candidates per row and position are.
    lm_topk: int = 50
    match_weight: float = 5000.0
    swaps_per_row: int = 4
    exact_candidates: int = 4


@dataclass
class GenerationConfig:
    n_real: int = 50
    rounds: int = 1
    batch_size: int = 8
    seq_len: int = 16
    # lm_sample: sequences sampled from the LM (readable start); random: random allowed tokens.
    init: str = "lm_sample"
    init_temperature: float = 1.0
    # Draw this many initial sequences (null: batch_size) in one batched decode and start from the
    # batch_size whose mean gradient best matches the target: a better start for the same ADMM budget.
    init_candidates: Optional[int] = 64
    # Optimise this many rounds (of any classes) side by side in one batch of rounds_per_batch x
    # batch_size sequences: the same results (up to float rounding) in fewer, larger model calls, which
    # an accelerator runs in about the time of one. A NaN restarts every round of its batch.
    rounds_per_batch: int = 1
    # Save the batch in progress every N outer steps (finished rounds are always saved).
    checkpoint_every: int = 1
    # A round whose loss or embeddings turn NaN/inf restarts from a fresh initialisation this often,
    # then is recorded as failed while the other rounds go on.
    max_restarts: int = 2


@dataclass
class MatchingConfig:
    # What is matched (gradmm.method.matched_gradient): output_layer (closed form, the paper's), parameters (the linear
    # layers whose names match `modules`), lora (rank-`lora_rank` adapters at initialisation on them).
    kind: str = "parameters"
    modules: list[str] = "${model.class_signal_modules}"
    lora_rank: int = 8
    lora_seed: int = 0
    loss: str = "label_words"
    distance: str = "cosine"
    # Weight of the class-balanced union's distance next to each class's own (gradients.Objective).
    union_weight: float = 0.0


@dataclass
class PrivacyConfig:
    # none, or dp: per-class targets released with the Gaussian mechanism (gradmm.privacy.dp).
    name: str = "none"
    epsilon: float = 1.0
    delta: float = 1e-5
    clip: float = 1.0
    # replace_one (Delta = 2C) or add_remove (Delta = C): gradmm.privacy.dp says why replace_one is the default.
    relation: str = "replace_one"
    # Refuse a release that would take the epsilon composed over every release on the same real examples
    # (the ledger, gradmm.privacy.ledger) above this; null: no limit, the total is still reported.
    budget_epsilon: Optional[float] = None
    # Under dp the leakage audit (it quotes real texts) runs only when this names a private folder
    # outside paths.output_root; it writes there, and the job's files only say where.
    audit_dir: Optional[str] = None


@dataclass
class DataConfig:
    # An earlier job directory whose synthetic(_filtered).jsonl the filter/evaluate stages read when
    # this job does not generate.
    synthetic_from: Optional[str] = None
    # True when synthetic_from is a job of another task whose texts this task evaluates on purpose
    # (SST-2 texts on Rotten Tomatoes): its labels are read by index; the summary records the transfer.
    transfer: bool = False


@dataclass
class FilterConfig:
    n_per_class: int = 8
    # zero_shot / few_shot: drop texts the model, as a classifier (few_shot: after few_shot_k of the
    # generator's real examples as demonstrations), assigns to another class; none: keep them.
    classifier: str = "zero_shot"
    few_shot_k: int = 4
    near_duplicate: float = 0.8
    log_ppl_weight: float = 0.0


@dataclass
class EvaluateConfig:
    # What the model is fine-tuned on, and the references computed next to it.
    train_on: str = "synthetic_filtered"
    baselines: list[str] = field(default_factory=lambda: ["zero_shot"])
    n_train: int = 100
    steps: int = 30
    batch_size: int = 16
    lrs: list[float] = field(default_factory=lambda: [1e-5])
    eval_every: int = 10
    seeds: list[int] = field(default_factory=lambda: [0])
    n_dev: int = 100
    few_shot_k: int = 4
    # Evaluate on a seeded stratified sample of the evaluation split (null: all of it).
    max_eval: Optional[int] = None
    # What trains: a gradmm.method.fine_tuning class and its settings, from conf/evaluate/method/
    # (evaluate/method=lora).
    # Any, so that a new method's settings need no schema change; validation builds it to check them.
    method: Any = field(default_factory=lambda: {"_target_": "gradmm.method.fine_tuning.FullWeights"})


@dataclass
class TrackerConfig:
    # online falls back to offline when no W&B API key is configured.
    mode: str = "online"
    project: str = "gradmm"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    # Fine-tuned weights are uploaded as W&B artifacts only when asked: they are large.
    upload_weights: bool = False


@dataclass
class PathsConfig:
    # None reads datasets from the Hugging Face hub; a folder reads <data_dir>/<task>/<split>.jsonl.
    data_dir: Optional[str] = "${oc.env:GRADMM_DATA_DIR,../shared/data}"
    output_root: str = "outputs"
    cache_dir: str = "${oc.env:GRADMM_CACHE,${oc.env:HOME}/.cache/gradmm}"
    # Per-class target gradients shared by the jobs of a sweep (gradmm.runs.target_cache): on a cluster, a
    # filesystem every job sees.
    target_cache_dir: str = "${paths.cache_dir}/targets"


@dataclass
class ObjectiveConfig:
    # The summary.json value run.py returns to a sweeper (hydra/sweeper=search optimises it), and
    # which way is better; a failed or NaN job returns the worst value so the sweep carries on.
    metric: str = "grad_distance_set"
    direction: str = "minimize"


@dataclass
class Config:
    seed: int = 0
    validate_only: bool = False
    stages: list[str] = field(default_factory=lambda: ["generate", "filter", "evaluate"])
    # Re-running a config continues its earlier job directory; false starts over in a new one.
    resume: bool = True
    task: TaskConfig = MISSING
    model: ModelConfig = MISSING
    admm: AdmmConfig = field(default_factory=AdmmConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # Reuse per-class targets stored under paths.cache_dir by earlier jobs (gradmm.runs.target_cache);
    # reading them back gives the same tensors, so this is not part of the science config.
    cache_targets: bool = True


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id)


register_configs()
