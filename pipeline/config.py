"""Validated configuration for each stage: one dataclass per stage, checked in one place.

The CLI builds these from its options; library code only ever receives a validated config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
CUDA_GRAPHS = ("auto", "on", "off")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the option."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of `talon extract` (field docs are the CLI help)."""

    out: Path
    target: str = "smollm2"
    data: str = "sharegpt"
    max_samples: int | None = None
    max_length: int = 2048
    top_k: int = 64
    layers: tuple[int, ...] | None = None
    batch_tokens: int = 8192
    part_tokens: int = 65536
    device: str = "auto"
    skip_bad_records: bool = False
    progress: bool = True
    feature_dtype: str = "bf16"
    teacher: str = "topk"
    aux_compression: str = "auto"
    shard_index: int | None = None
    num_shards: int | None = None
    backend: str = "hf"
    vllm_gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    tokenizer_workers: int | None = None  # None: stage_extract.run.tokenizer_processes decides
    batching: str = "auto"
    cuda_graphs: str = "auto"

    def __post_init__(self) -> None:
        from schemas.layout import AUX_COMPRESSIONS, BATCHINGS, FEATURE_DTYPES, TEACHERS

        _require(self.backend in ("hf", "vllm"), "--backend must be hf or vllm")
        _require(0 < self.vllm_gpu_memory_utilization <= 1, "--vllm-gpu-memory-utilization must be in (0, 1]")
        _require(self.tensor_parallel_size >= 1, "--tensor-parallel-size must be at least 1")
        _require(self.backend == "vllm" or self.tensor_parallel_size == 1, "--tensor-parallel-size only applies to --backend vllm")
        _require(self.backend != "vllm" or self.device != "cpu", "--backend vllm runs on a GPU; use --device auto or cuda")

        _require(self.max_samples is None or self.max_samples > 0, "--max-samples must be positive")
        _require(self.max_length >= 2, "--max-length must be at least 2")
        _require(1 <= self.top_k <= 65536, "--top-k must be between 1 and 65536")
        _require(self.batch_tokens >= self.max_length, f"--batch-tokens ({self.batch_tokens}) must be at least --max-length ({self.max_length}) so every sample fits a batch")
        _require(self.part_tokens >= 1, "--part-tokens must be positive")
        _require(self.tokenizer_workers is None or 0 <= self.tokenizer_workers <= 64, "--tokenizer-workers must be in [0, 64]")
        _require(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}")
        _require(self.layers is None or len(self.layers) == 3, "--layers needs exactly three comma-separated ids")
        _require(self.feature_dtype in FEATURE_DTYPES, f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}")
        _require(self.teacher in TEACHERS, f"--teacher must be one of {', '.join(TEACHERS)}")
        _require(self.aux_compression in AUX_COMPRESSIONS, f"--aux-compression must be one of {', '.join(AUX_COMPRESSIONS)}")
        _require(self.batching in BATCHINGS, f"--batching must be one of {', '.join(BATCHINGS)}")
        _require(self.cuda_graphs in CUDA_GRAPHS, f"--cuda-graphs must be one of {', '.join(CUDA_GRAPHS)}")
        _require(self.cuda_graphs != "on" or (self.backend == "hf" and self.batching != "padded" and self.device != "cpu"),
                 "--cuda-graphs on replays the hf backend's packed forwards on a GPU; this run has --backend "
                 f"{self.backend}, --batching {self.batching} (a resumed cache keeps the batching it was started with), "
                 f"--device {self.device}")
        _require((self.shard_index is None) == (self.num_shards is None), "--shard-index and --num-shards go together")
        _require(self.num_shards is None or self.num_shards >= 1, "--num-shards must be positive")
        _require(
            self.num_shards is None or self.shard_index is None or 0 <= self.shard_index < self.num_shards,
            f"--shard-index must be in [0, --num-shards) (got {self.shard_index} of {self.num_shards})",
        )


@dataclass(frozen=True)
class TrainConfig:
    """Settings of `talon train` (field docs are the CLI help)."""

    cache: Path
    out: Path
    target: str | None = None
    ttt_steps: int = 7
    draft_vocab: int = 32000
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float = 3e-4
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    batch_tokens: int = 8192
    max_length: int | None = None
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    grad_accum: int = 1
    val_fraction: float = 0.0
    eval_every: int | None = None
    save_every: int | None = None
    skip_nonfinite: int = 0
    fsdp: bool = False
    gradient_checkpointing: bool = False
    skip_parts: tuple[str, ...] = ()
    teacher: str = "auto"
    attention: str = "auto"
    soft_ce: str = "fused"
    compile_step: bool | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _require(1 <= self.ttt_steps <= 32, "--ttt-steps must be between 1 and 32")
        _require(self.draft_vocab >= 2, "--draft-vocab must be at least 2")
        _require(self.max_steps is None or self.max_steps > 0, "--max-steps must be positive")
        _require(self.epochs > 0, "--epochs must be positive")
        _require(self.lr > 0, "--lr must be positive")
        _require(0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)")
        _require(0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]")
        _require(self.grad_clip > 0, "--grad-clip must be positive")
        _require(self.batch_tokens >= 2, "--batch-tokens must be at least 2")
        _require(self.max_length is None or self.max_length >= 2, "--max-length must be at least 2")
        _require(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}")
        _require(self.log_every >= 1, "--log-every must be positive")
        _require(self.grad_accum >= 1, "--grad-accum must be positive")
        _require(0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)")
        _require(self.eval_every is None or self.eval_every >= 1, "--eval-every must be positive")
        _require(
            self.save_every is None or (self.save_every >= 1 and self.save_every % self.log_every == 0),
            f"--save-every must be a positive multiple of --log-every ({self.log_every}) so a resumed run "
            "logs the same windows",
        )
        _require(self.skip_nonfinite >= 0, "--skip-nonfinite must be >= 0")
        _require(isinstance(self.gradient_checkpointing, bool), "--gradient-checkpointing must be true or false")
        _require(self.teacher in ("auto", "topk", "final-hidden"), "--teacher must be auto, topk or final-hidden")
        _require(self.attention in ("auto", "eager", "flex"), "--attention must be auto, eager or flex")
        _require(self.soft_ce in ("reference", "fused"), "--soft-ce must be reference or fused")
        _require(self.compile_step in (None, True, False), "--compile-step must be true or false (or unset: on for CUDA)")
        _require(not (self.compile_step is True and self.fsdp), "--compile-step is not supported with --fsdp yet (use DDP)")


def train_config_from_dict(values: dict[str, Any], *, where: str) -> TrainConfig:
    """Build a TrainConfig from a mapping (a config file, a saved run), refusing unknown keys."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown train setting(s) {unknown}; known: {sorted(known)}")
    values = dict(values)
    if isinstance(values.get("skip_parts"), (list, str)):
        parts = values["skip_parts"]
        values["skip_parts"] = tuple(p for p in (parts.split(",") if isinstance(parts, str) else parts) if p)
    for key in ("cache", "out"):
        if key in values and values[key] is not None:
            values[key] = Path(values[key])
    return TrainConfig(**values)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML or YAML file of settings (a flat table, or a [train] table)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML ({err})") from err
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({err})") from err
    else:
        raise ConfigError(f"{path}: config files must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings")
    return dict(data.get("train", data))


def config_to_dict(config: Any) -> dict[str, Any]:
    data = asdict(config)
    return {f.name: (str(data[f.name]) if isinstance(data[f.name], Path) else data[f.name]) for f in fields(config)}
