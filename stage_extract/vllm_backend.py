"""`talon extract --backend vllm`: the target runs in vLLM, features land in the same cache schema.

Why vLLM's own capture and not hooks: a peer that sliced packed vLLM batches back into requests by
hand returned another request's hidden states under batching and chunked prefill, silently
(speculators #279).  vLLM's ``extract_hidden_states`` speculative method writes the chosen hidden
states of every scheduled token into a paged cache through the request's own slot mapping, and
``ExampleHiddenStatesConnector`` gathers them back from the request's block table when it finishes:
one safetensors file per request (``hidden_states [T, P, H]``, ``token_ids [T]``), its path in
``kv_transfer_params["hidden_states_path"]``.  Here every request gets an id that is looked up
(never a position in an output list), and the token ids vLLM saw are compared with ours, per record.

Layer convention.  Our cache records OUTPUT-of-layer 0-based ids (``(1, L//2-1, L-4)`` by default,
HF ``hidden_states[i + 1]``).  vLLM's ``eagle_aux_hidden_state_layer_ids`` are INPUT-of-layer ids:
its index ``k`` is the residual stream before layer ``k`` runs, i.e. HF ``hidden_states[k]``, and
``k = L`` is the final state before the final norm.  So vLLM id = ours + 1, plus ``L`` for the
pre-norm final state, from which the top-k log-probs are computed here with the target's own final
norm and LM head (loaded alone from the checkpoint), never with vLLM's ``prompt_logprobs``.  vLLM
stores the planes in ascending layer order, whatever order the ids are given in.

What comes out is the cache's feature planes with :func:`extract_batch`'s semantics (bf16 or fp8
aux, int32 top-k ids, pre-norm ``final_hidden``, a ``finite`` flag per token), as
:class:`~stage_extract.backends.FeatureBatch` es on the CPU that name the positions of their
samples, so run.py hands them to the part writer exactly like the HF path's batches.

Nothing here imports vLLM at module import time: :func:`require_vllm` does, when an engine starts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from schemas.layout import check_feature_settings, has_final_hidden, has_topk
from stage_extract.backends import BackendUnavailable, FeatureBatch, Sample, _KeyedCompute, check_unique_records
from stage_extract.head_topk import topk_from_logits
from stage_extract.quant import quantize_fp8

VLLM_VERSION = "0.26.0"
INSTALL_HINT = (
    "install the optional extra from the Talon checkout with `pip install '.[vllm]'` "
    f"(vllm=={VLLM_VERSION}, which pins torch 2.11.0), or use --backend hf"
)
CONNECTOR = "ExampleHiddenStatesConnector"


def require_vllm():
    """Import vLLM or explain how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise BackendUnavailable(f"--backend vllm needs vLLM, which is not installed ({err}); {INSTALL_HINT}") from err
    version = getattr(vllm, "__version__", "unknown")
    if version.split("+")[0] != VLLM_VERSION:
        warnings.warn(
            f"Talon's vLLM backend was written against vllm {VLLM_VERSION}; found {version}. "
            "The per-record token and shape checks still guard the output.",
            stacklevel=2,
        )
    return vllm


# --------------------------------------------------------------------------- layer convention


@dataclass(frozen=True)
class CapturePlan:
    """Which hidden states vLLM captures, and where each of ours sits in its output file."""

    vllm_layer_ids: tuple[int, ...]  # input-of-layer ids, ascending and unique: the file's plane order
    aux_planes: tuple[int, ...]  # plane of each of our aux layers, in the order our ids were given
    final_plane: int  # plane of the pre-norm final state (vLLM id = num_layers)

    @property
    def num_planes(self) -> int:
        return len(self.vllm_layer_ids)


def capture_plan(layer_ids: Sequence[int], num_layers: int) -> CapturePlan:
    """Translate our output-of-layer ids into vLLM's input-of-layer ids (+1), plus ``num_layers``
    for the pre-norm final state.  Our last layer's output *is* that final state, so if it is one
    of the aux layers both share a plane (vLLM would capture it once)."""
    ids = [int(i) for i in layer_ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"aux layer ids must be distinct, got {ids}")
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"aux layer ids {bad} out of range: the target has layers 0..{num_layers - 1}")
    vllm_ids = tuple(sorted({i + 1 for i in ids} | {num_layers}))
    return CapturePlan(
        vllm_layer_ids=vllm_ids,
        aux_planes=tuple(vllm_ids.index(i + 1) for i in ids),
        final_plane=vllm_ids.index(num_layers),
    )


# --------------------------------------------------------------------------- the target's head


def _checkpoint_tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a sharded or single-file checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors checkpoint (the vLLM backend reads the final norm and LM head from it)")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names.update({name: file for name in handle.keys()})
    return names


def _read_tensor(files: dict[str, Path], name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(files[name]), framework="pt") as handle:
        return handle.get_tensor(name)


def _find(files: dict[str, Path], *candidates: str) -> str | None:
    return next((name for name in candidates if name in files), None)


class TargetHead:
    """The target's final RMSNorm and LM head, applied to pre-norm final states.

    Only these two weights are read from the checkpoint (``tie_word_embeddings`` -> the input
    embedding is the head), so the full model is never loaded twice next to vLLM.  The arithmetic
    follows HF Llama (norm in fp32, cast back, times the weight; head in the compute dtype; then
    fp32 log-softmax), so the top-k equals what :func:`extract_batch` computes from the same state.
    """

    def __init__(self, norm_weight: torch.Tensor, head_weight: torch.Tensor, eps: float):
        if norm_weight.shape[0] != head_weight.shape[1]:
            raise ValueError(f"final norm width {norm_weight.shape[0]} does not match the LM head {tuple(head_weight.shape)}")
        self.norm_weight = norm_weight
        self.head_weight = head_weight
        self.eps = float(eps)

    @property
    def device(self) -> torch.device:
        return self.head_weight.device

    @property
    def vocab_size(self) -> int:
        return int(self.head_weight.shape[0])

    @classmethod
    def from_hf_folder(cls, folder: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> "TargetHead":
        from transformers import AutoConfig

        folder = Path(folder)
        config = AutoConfig.from_pretrained(str(folder))
        files = _checkpoint_tensor_files(folder)
        norm = _find(files, "model.norm.weight", "norm.weight")
        if norm is None:
            raise KeyError(f"{folder}: no final norm weight (model.norm.weight) in the checkpoint")
        embed = _find(files, "model.embed_tokens.weight", "embed_tokens.weight")
        head = embed if getattr(config, "tie_word_embeddings", False) else _find(files, "lm_head.weight")
        if head is None:
            raise KeyError(
                f"{folder}: no LM head weight (lm_head.weight, or model.embed_tokens.weight when tie_word_embeddings)"
            )
        return cls(
            _read_tensor(files, norm).to(device=device, dtype=dtype),
            _read_tensor(files, head).to(device=device, dtype=dtype),
            eps=float(getattr(config, "rms_norm_eps", 1e-6)),
        )

    def to(self, device: torch.device | str) -> "TargetHead":
        return TargetHead(self.norm_weight.to(device), self.head_weight.to(device), self.eps)

    def normalize(self, final_prenorm: torch.Tensor) -> torch.Tensor:
        x = final_prenorm.to(device=self.device, dtype=self.head_weight.dtype)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.norm_weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)

    @torch.inference_mode()
    def topk(self, final_prenorm: torch.Tensor, k: int, chunk_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (ids int32, log-probs float32) of each row, in chunks of rows so the
        ``rows x vocab`` logits never exist at once."""
        ids, logprobs = [], []
        for start in range(0, final_prenorm.shape[0], chunk_tokens):
            normed = self.normalize(final_prenorm[start : start + chunk_tokens])
            chunk_ids, chunk_logprobs = topk_from_logits(torch.nn.functional.linear(normed, self.head_weight), k)
            ids.append(chunk_ids)
            logprobs.append(chunk_logprobs)
        if not ids:
            return torch.zeros((0, k), dtype=torch.int32), torch.zeros((0, k), dtype=torch.float32)
        return torch.cat(ids), torch.cat(logprobs)


# --------------------------------------------------------------------------- capture files -> features


def check_token_ids(record_index: int, expected: np.ndarray, got, source: str) -> None:
    """The ids vLLM computed on must be exactly the ids we store; anything else names the record."""
    got = np.asarray(got.cpu().numpy() if isinstance(got, torch.Tensor) else got, dtype=np.int64).reshape(-1)
    expected = np.asarray(expected, dtype=np.int64).reshape(-1)
    if got.shape == expected.shape and np.array_equal(got, expected):
        return
    if got.shape != expected.shape:
        detail = f"{len(got)} tokens instead of {len(expected)}"
    else:
        first = int(np.flatnonzero(got != expected)[0])
        detail = f"first difference at position {first}: {int(got[first])} instead of {int(expected[first])}"
    raise ValueError(f"record {record_index}: {source} differ from the stored input_ids ({detail})")


def planes_from_captures(
    captures: Sequence[torch.Tensor],
    plan: CapturePlan,
    head: TargetHead | None,
    *,
    top_k: int,
    feature_dtype: str = "bf16",
    teacher: str = "topk",
    head_chunk_tokens: int = 4096,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Connector outputs (``hidden_states [T, P, H]`` each) -> the cache's feature planes, rows of
    all captures concatenated, with the semantics of :func:`extract_batch`: aux planes in our
    layer order (bf16, or fp8 codes + per-token scales), the top-k from the pre-norm final plane
    through the target head, that plane itself when the teacher keeps it, and ``finite`` per row
    (checked before any rounding)."""
    check_feature_settings(feature_dtype, teacher)
    if has_topk(teacher) and head is None:
        raise ValueError("a top-k teacher needs the target head")
    device = torch.device(device) if device is not None else (head.device if head is not None else torch.device("cpu"))
    hidden = torch.cat([c.to(device, non_blocking=True) for c in captures]) if captures else torch.zeros((0, plan.num_planes, 0))
    aux = torch.cat([hidden[:, p] for p in plan.aux_planes], dim=-1)
    finite = torch.isfinite(aux).all(dim=-1)
    planes: dict[str, torch.Tensor] = {}
    if feature_dtype == "fp8":
        aux, scale = quantize_fp8(aux, groups=len(plan.aux_planes))
        finite &= torch.isfinite(scale).all(dim=-1)
        planes["aux_scale"] = scale
    else:
        aux = aux.to(torch.bfloat16)
    planes["aux_hidden"] = aux
    final = hidden[:, plan.final_plane]
    if has_final_hidden(teacher):
        finite &= torch.isfinite(final).all(dim=-1)
        planes["final_hidden"] = final.to(torch.bfloat16)
    if has_topk(teacher):
        ids, logprobs = head.topk(final, top_k, head_chunk_tokens)
        finite &= torch.isfinite(logprobs).all(dim=-1)
        planes["topk_ids"] = ids
        planes["topk_logprobs"] = logprobs
    planes["finite"] = finite
    return planes


def read_capture_file(path: str | Path, *, timeout_s: float = 600.0, remove: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one connector file (``hidden_states``, ``token_ids``) once its writer is done.

    The connector holds an exclusive flock on ``PATH.lock`` from before the path is returned until
    the asynchronous write finishes, so a shared lock here means the file is complete.  Waiting is
    bounded: an engine that never writes (e.g. ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, where nobody
    steps the engine once every request has finished) fails with a message instead of hanging.
    """
    from safetensors.torch import load_file

    path = Path(path)
    lock = Path(f"{path}.lock")
    deadline = time.monotonic() + timeout_s
    while not lock.exists() and not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"vLLM never created {path} (or its .lock) within {timeout_s:.0f} s")
        time.sleep(0.002)
    handle = open(lock) if lock.exists() else None
    try:
        while handle is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"vLLM did not finish writing {path} within {timeout_s:.0f} s; the engine must run in its own "
                        "process (leave VLLM_ENABLE_V1_MULTIPROCESSING at its default, 1)"
                    ) from err
                time.sleep(0.002)
        if not path.exists():
            raise RuntimeError(
                f"vLLM released {lock.name} without writing {path}; its log should show 'Hidden-states write failed'"
            )
        data = load_file(str(path))
    finally:
        if handle is not None:
            handle.close()
    if remove:
        path.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)
    if "hidden_states" not in data or "token_ids" not in data:
        raise ValueError(f"{path}: expected tensors hidden_states and token_ids, found {sorted(data)}")
    return data["hidden_states"], data["token_ids"]


# --------------------------------------------------------------------------- request bookkeeping


class RequestBook:
    """Request id <-> record for one :meth:`VLLMBackend.feature_batches` call.

    Every request id is issued here and every finished request is claimed by its id, exactly
    once; a result for an id we never issued, a second result for one id, or an id that never
    comes back is an error naming the record.  Output order plays no part.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._pending: dict[str, tuple[int, np.ndarray]] = {}
        self._claimed: set[str] = set()

    def add(self, record_index: int, input_ids: np.ndarray) -> str:
        request_id = f"{self.prefix}-r{int(record_index)}"
        if request_id in self._pending or request_id in self._claimed:
            raise ValueError(f"record {record_index} was submitted twice")
        self._pending[request_id] = (int(record_index), np.asarray(input_ids, dtype=np.int64))
        return request_id

    def claim(self, request_id: str) -> tuple[int, np.ndarray]:
        if request_id in self._claimed:
            raise RuntimeError(f"vLLM returned request {request_id!r} twice")
        if request_id not in self._pending:
            raise RuntimeError(f"vLLM returned request {request_id!r}, which this batch never submitted")
        self._claimed.add(request_id)
        return self._pending.pop(request_id)

    def outstanding(self) -> list[int]:
        return sorted(record for record, _ in self._pending.values())


# --------------------------------------------------------------------------- the engine seam


@dataclass(frozen=True)
class FinishedRequest:
    """What the backend needs from one finished vLLM request."""

    request_id: str
    prompt_token_ids: Sequence[int] | None
    hidden_states_path: str
    num_cached_tokens: int | None = None


class CaptureEngine(Protocol):
    """The slice of vLLM the backend drives (a fake one in the CPU tests)."""

    def submit(self, request_id: str, token_ids: list[int]) -> None: ...

    def finished(self) -> Iterator[FinishedRequest]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class VLLMOptions:
    """Engine settings of ``--backend vllm`` (validated here, once)."""

    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default: max(8192, max_model_len)
    # None keeps vLLM's default (on for Llama).  Since vLLM PR #43805 the connector gathers a
    # request's states from its block table once it finishes, so chunks are reassembled; vLLM
    # 0.26's docs still say to disable chunked prefill, while its engine warns that disabling it
    # is unsupported for generative models.  The benchmark checks equivalence either way.
    chunked_prefill: bool | None = None
    enforce_eager: bool = False
    dtype: str = "bfloat16"
    capture_dir: str | None = None  # default: a fresh directory under /dev/shm (else the temp dir)
    file_timeout_s: float = 600.0
    head_chunk_tokens: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("--vllm-gpu-memory-utilization must be in (0, 1]")
        if self.tensor_parallel_size < 1:
            raise ValueError("--tensor-parallel-size must be at least 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be positive")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if self.dtype not in ("bfloat16", "float16", "float32", "auto"):
            raise ValueError(f"vLLM dtype {self.dtype!r} is not one of bfloat16, float16, float32, auto")
        if self.file_timeout_s <= 0 or self.head_chunk_tokens < 1:
            raise ValueError("file_timeout_s and head_chunk_tokens must be positive")


def _default_capture_dir(min_free_bytes: int = 8 << 30) -> str:
    """RAM-backed /dev/shm when it is roomy (files live only until read); containers often give it
    64 MiB, which a burst of finished requests would overflow, so then the temp dir."""
    shm = Path("/dev/shm")
    base = None
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= min_free_bytes:
        base = str(shm)
    return tempfile.mkdtemp(prefix="talon-vllm-", dir=base)


class VllmCaptureEngine:
    """An offline vLLM engine with hidden-state capture, driven request by request.

    Requests go straight to ``LLM.llm_engine`` with ids we choose, so every output carries the id
    of the record it belongs to (``LLM.generate`` would number them itself).
    """

    def __init__(self, target_path: str, plan: CapturePlan, *, max_model_len: int, capture_dir: str, options: VLLMOptions):
        require_vllm()
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0":
            raise BackendUnavailable(
                "--backend vllm needs vLLM's engine in its own process (the connector writes files after the "
                "last step); unset VLLM_ENABLE_V1_MULTIPROCESSING=0"
            )
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:  # the engine-input form LLM.generate renders a TokensPrompt into
            from vllm.inputs import tokens_input

            self._prompt = tokens_input
        except ImportError:  # older layouts take the TokensPrompt itself
            from vllm.inputs import TokensPrompt

            self._prompt = lambda ids: TokensPrompt(prompt_token_ids=ids)
        batched = options.max_num_batched_tokens or max(8192, max_model_len)
        self._llm = LLM(
            model=str(target_path),
            skip_tokenizer_init=True,  # prompts are token ids; nothing is detokenised
            dtype=options.dtype,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_model_len=max_model_len,
            max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=batched,
            enable_prefix_caching=False,  # cached prefixes skip capture (vLLM #44485)
            **({} if options.chunked_prefill is None else {"enable_chunked_prefill": options.chunked_prefill}),
            enforce_eager=options.enforce_eager,
            seed=options.seed,
            speculative_config={
                "method": "extract_hidden_states",
                "num_speculative_tokens": 1,
                "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(plan.vllm_layer_ids)}},
            },
            kv_transfer_config={
                "kv_connector": CONNECTOR,
                "kv_role": "kv_producer",
                "kv_connector_extra_config": {"shared_storage_path": capture_dir, "use_synchronization_lock": True},
            },
        )
        self._engine = self._llm.llm_engine
        self._params = SamplingParams(
            max_tokens=1, temperature=0.0, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY
        )

    def submit(self, request_id: str, token_ids: list[int]) -> None:
        self._engine.add_request(request_id, self._prompt(token_ids), self._params)

    def finished(self) -> Iterator[FinishedRequest]:
        while self._engine.has_unfinished_requests():
            for output in self._engine.step():
                if not output.finished:
                    continue
                path = (output.kv_transfer_params or {}).get("hidden_states_path")
                if path is None:
                    raise RuntimeError(
                        f"vLLM finished request {output.request_id!r} without a hidden_states_path; "
                        f"is the {CONNECTOR} active?"
                    )
                yield FinishedRequest(
                    request_id=output.request_id,
                    prompt_token_ids=output.prompt_token_ids,
                    hidden_states_path=path,
                    num_cached_tokens=getattr(output, "num_cached_tokens", None),
                )

    def close(self) -> None:
        core = getattr(self._engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self._llm = self._engine = None


# --------------------------------------------------------------------------- the backend


class VLLMBackend(_KeyedCompute):
    """Feature backend on vLLM (see the module docstring).  Build it with :meth:`open`; the
    constructor takes the pieces, so tests can drive it with a fake engine.

    Finished requests are grouped until ``group_tokens`` tokens are ready, converted on
    ``work_device`` (the GPU holding the head: fp8 quantisation and the top-k run there) and
    handed out as CPU :class:`FeatureBatch` es, so run.py's host transfer is a plain hand-over.
    """

    name = "vllm"
    device = torch.device("cpu")

    def __init__(
        self,
        engine: CaptureEngine,
        head: TargetHead | None,
        plan: CapturePlan,
        *,
        top_k: int,
        hidden_size: int,
        max_prompt_len: int | None = None,
        feature_dtype: str = "bf16",
        teacher: str = "topk",
        work_device: torch.device | str | None = None,
        file_timeout_s: float = 600.0,
        head_chunk_tokens: int = 4096,
        group_tokens: int = 8192,
        capture_dir: str | None = None,
        owns_capture_dir: bool = False,
    ):
        check_feature_settings(feature_dtype, teacher)
        if has_topk(teacher) and head is None:
            raise ValueError("a top-k teacher needs the target head")
        self.engine = engine
        self.head = head
        self.plan = plan
        self.top_k = int(top_k)
        self.hidden_size = int(hidden_size)
        self.max_prompt_len = max_prompt_len
        self.feature_dtype = feature_dtype
        self.teacher = teacher
        self.work_device = torch.device(work_device) if work_device is not None else (head.device if head is not None else torch.device("cpu"))
        self.file_timeout_s = float(file_timeout_s)
        self.head_chunk_tokens = int(head_chunk_tokens)
        self.group_tokens = int(group_tokens)
        self.capture_dir = capture_dir
        self._owns_capture_dir = owns_capture_dir
        self._calls = 0

    @classmethod
    def open(
        cls,
        target_path: str | Path,
        *,
        layer_ids: Sequence[int],
        top_k: int,
        max_length: int,
        feature_dtype: str = "bf16",
        teacher: str = "topk",
        options: VLLMOptions = VLLMOptions(),
        head_device: torch.device | str = "cuda",
    ) -> "VLLMBackend":
        """Start vLLM on an HF folder.  ``max_length`` is the longest prompt it will get; vLLM needs
        one more position for the token it samples."""
        require_vllm()  # fail with the install hint before reading anything
        from transformers import AutoConfig

        check_feature_settings(feature_dtype, teacher)
        config = AutoConfig.from_pretrained(str(target_path))
        num_layers = int(config.num_hidden_layers)
        plan = capture_plan(layer_ids, num_layers)
        limit = int(getattr(config, "max_position_embeddings", max_length + 1))
        max_model_len = min(max_length + 1, limit)
        # Read the head before starting the engine (a bad checkpoint fails fast); move it to the GPU
        # after, so vLLM's start-up memory check sees the card free.
        head = TargetHead.from_hf_folder(target_path, device="cpu", dtype=torch.bfloat16) if has_topk(teacher) else None
        capture_dir = options.capture_dir or _default_capture_dir()
        Path(capture_dir).mkdir(parents=True, exist_ok=True)
        engine = VllmCaptureEngine(str(target_path), plan, max_model_len=max_model_len, capture_dir=capture_dir, options=options)
        return cls(
            engine,
            head.to(head_device) if head is not None else None,
            plan,
            top_k=top_k,
            hidden_size=int(config.hidden_size),
            max_prompt_len=max_model_len - 1,
            feature_dtype=feature_dtype,
            teacher=teacher,
            work_device=head_device,
            file_timeout_s=options.file_timeout_s,
            head_chunk_tokens=options.head_chunk_tokens,
            capture_dir=capture_dir,
            owns_capture_dir=options.capture_dir is None,
        )

    def feature_batches(self, samples: Sequence[Sample]) -> Iterator[FeatureBatch]:
        check_unique_records(samples)
        for record_index, ids in samples:
            if len(ids) == 0:
                raise ValueError(f"record {record_index}: an empty sample cannot be sent to vLLM")
            if self.max_prompt_len is not None and len(ids) > self.max_prompt_len:
                raise ValueError(
                    f"record {record_index}: {len(ids)} tokens exceed the {self.max_prompt_len} the vLLM engine was "
                    "started for (max_length)"
                )
        book = RequestBook(prefix=f"talon{self._calls}")
        self._calls += 1
        position_of: dict[int, int] = {}
        for position, (record_index, ids) in enumerate(samples):
            position_of[int(record_index)] = position
            self.engine.submit(book.add(record_index, ids), [int(t) for t in ids])
        group: list[tuple[int, torch.Tensor]] = []
        group_tokens = 0
        for done in self.engine.finished():
            record_index, expected = book.claim(done.request_id)
            if done.prompt_token_ids is not None:
                check_token_ids(record_index, expected, done.prompt_token_ids, "the prompt token ids vLLM reports")
            if done.num_cached_tokens:
                raise RuntimeError(
                    f"record {record_index}: vLLM served {done.num_cached_tokens} tokens from its prefix cache, whose "
                    "hidden states are never captured; prefix caching must stay off"
                )
            hidden, token_ids = read_capture_file(done.hidden_states_path, timeout_s=self.file_timeout_s)
            check_token_ids(record_index, expected, token_ids, "the token ids in vLLM's hidden-states file")
            want = (len(expected), self.plan.num_planes, self.hidden_size)
            if tuple(hidden.shape) != want:
                raise ValueError(
                    f"record {record_index}: vLLM's hidden states have shape {tuple(hidden.shape)}, expected {want} "
                    f"(tokens, planes for layers {list(self.plan.vllm_layer_ids)}, hidden)"
                )
            group.append((record_index, hidden))
            group_tokens += len(expected)
            if group_tokens >= self.group_tokens:
                yield self._batch(group, position_of)
                group, group_tokens = [], 0
        if group:
            yield self._batch(group, position_of)
        missing = book.outstanding()
        if missing:
            shown = ", ".join(str(r) for r in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise RuntimeError(f"vLLM never returned {len(missing)} request(s), for records {shown}")

    def _batch(self, group: list[tuple[int, torch.Tensor]], position_of: dict[int, int]) -> FeatureBatch:
        planes = planes_from_captures(
            [hidden for _, hidden in group],
            self.plan,
            self.head,
            top_k=self.top_k,
            feature_dtype=self.feature_dtype,
            teacher=self.teacher,
            head_chunk_tokens=self.head_chunk_tokens,
            device=self.work_device,
        )
        return FeatureBatch(
            positions=[position_of[record] for record, _ in group],
            record_indices=[record for record, _ in group],
            lengths=[int(hidden.shape[0]) for _, hidden in group],
            planes={name: tensor.cpu() for name, tensor in planes.items()},
        )

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self._owns_capture_dir and self.capture_dir:
            shutil.rmtree(self.capture_dir, ignore_errors=True)
