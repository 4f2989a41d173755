"""Model-directory layout, a safe reader for ``cosyvoice2.yaml``, and the LM configuration.

The official loader hands ``cosyvoice2.yaml`` to hyperpyyaml, which imports and calls whatever the
tags name (``!new:``, ``!name:``, ``!apply:``).  A model directory is data, so we read the same file
with a ``yaml.SafeLoader`` subclass that turns every tag into plain data and resolves ``!ref``
references itself: nothing named in the file is ever imported or called.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = [
    "ConfigError",
    "REAL_QWEN2",
    "LLMConfig",
    "ModelDir",
    "read_model_yaml",
    "resolve_dtype",
    "resolve_device",
]


class ConfigError(ValueError):
    """A model directory or its yaml is incomplete or malformed."""


# ----------------------------------------------------------------------------------------------
# yaml: tags become data


class _Ref:
    """Placeholder for ``!ref <a> * <b>``; resolved once the whole document is read."""

    __slots__ = ("expr",)

    def __init__(self, expr: str):
        self.expr = expr

    def __repr__(self) -> str:
        return f"_Ref({self.expr!r})"


class _DataLoader(yaml.SafeLoader):
    """SafeLoader whose tags produce plain dicts instead of objects."""


def _node_data(loader: _DataLoader, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.MappingNode):
        return {"kwargs": loader.construct_mapping(node, deep=True)}
    if isinstance(node, yaml.SequenceNode):
        return {"args": loader.construct_sequence(node, deep=True)}
    value = loader.construct_scalar(node)
    return {"args": [value]} if value not in ("", None) else {}


def _tagged(kind: str):
    def construct(loader: _DataLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
        data = _node_data(loader, node)
        return {f"__{kind}__": suffix, **data.pop("kwargs", {}), **data}

    return construct


def _construct_ref(loader: _DataLoader, node: yaml.Node) -> _Ref:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"!ref must be a scalar, got {node.id} at {node.start_mark}")
    return _Ref(loader.construct_scalar(node))


def _unknown_tag(loader: _DataLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    # Anything else (!copy, !tuple, !include, !!python/object/apply:..., ...) stays inert data.
    return {"__tag__": node.tag, **_node_data(loader, node)}


_DataLoader.add_multi_constructor("!new:", _tagged("new"))
_DataLoader.add_multi_constructor("!name:", _tagged("name"))
_DataLoader.add_multi_constructor("!apply:", _tagged("apply"))
_DataLoader.add_constructor("!ref", _construct_ref)
_DataLoader.add_multi_constructor("!", _unknown_tag)
_DataLoader.add_multi_constructor("tag:yaml.org,2002:python/", _unknown_tag)
# YAML 1.1 reads "1e-06" (no dot) as a string; hyperpyyaml's loader reads it as a float.
_DataLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_REF_TOKEN = re.compile(r"<([^<>]+)>")
_ARITH_TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|([-+*/()]))")


def _lookup(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"!ref <{key}>: no such key")
        node = node[part]
    return node


def _arith(text: str) -> float | int:
    """Evaluate + - * / and parentheses over numbers (a tiny recursive-descent parser, no eval)."""
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _ARITH_TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ConfigError(f"!ref: cannot evaluate {text!r}")
        tokens.append(m.group(0).strip())
        pos = m.end()
    tokens = [t for t in tokens if t]

    def parse_expr(i: int) -> tuple[float | int, int]:
        value, i = parse_term(i)
        while i < len(tokens) and tokens[i] in "+-":
            rhs, j = parse_term(i + 1)
            value = value + rhs if tokens[i] == "+" else value - rhs
            i = j
        return value, i

    def parse_term(i: int) -> tuple[float | int, int]:
        value, i = parse_factor(i)
        while i < len(tokens) and tokens[i] in "*/":
            rhs, j = parse_factor(i + 1)
            value = value * rhs if tokens[i] == "*" else value / rhs
            i = j
        return value, i

    def parse_factor(i: int) -> tuple[float | int, int]:
        if i >= len(tokens):
            raise ConfigError(f"!ref: incomplete expression {text!r}")
        tok = tokens[i]
        if tok == "-":
            value, i = parse_factor(i + 1)
            return -value, i
        if tok == "(":
            value, i = parse_expr(i + 1)
            if i >= len(tokens) or tokens[i] != ")":
                raise ConfigError(f"!ref: unbalanced parentheses in {text!r}")
            return value, i + 1
        if tok in "+*/)":
            raise ConfigError(f"!ref: unexpected {tok!r} in {text!r}")
        number = float(tok)
        return (int(number) if number.is_integer() and re.fullmatch(r"\d+", tok) else number), i + 1

    value, end = parse_expr(0)
    if end != len(tokens):
        raise ConfigError(f"!ref: trailing tokens in {text!r}")
    return value


def _resolve(tree: dict[str, Any]) -> dict[str, Any]:
    resolving: set[str] = set()

    def ref_value(key: str) -> Any:
        if key in resolving:
            raise ConfigError(f"!ref <{key}>: circular reference")
        resolving.add(key)
        try:
            return walk(_lookup(tree, key))
        finally:
            resolving.discard(key)

    def evaluate(expr: str) -> Any:
        keys = _REF_TOKEN.findall(expr)
        if not keys:
            raise ConfigError(f"!ref {expr!r}: no <key> in reference")
        whole = _REF_TOKEN.fullmatch(expr.strip())
        if whole:
            return ref_value(whole.group(1))
        values = {k: ref_value(k) for k in keys}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
            return _arith(_REF_TOKEN.sub(lambda m: repr(values[m.group(1)]), expr))
        # hyperpyyaml also allows string interpolation, e.g. "!ref <dir>/file".
        return _REF_TOKEN.sub(lambda m: str(values[m.group(1)]), expr)

    def walk(node: Any) -> Any:
        if isinstance(node, _Ref):
            return evaluate(node.expr)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(tree)


def read_model_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a hyperpyyaml file as inert data.

    ``!new:mod.Cls`` with keyword arguments becomes ``{"__new__": "mod.Cls", **kwargs}``
    (``__name__`` / ``__apply__`` likewise), ``!ref`` is resolved against top-level keys (after
    ``overrides`` replace them, as hyperpyyaml's overrides do), unknown tags become
    ``{"__tag__": tag, ...}``.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        tree = yaml.load(text, Loader=_DataLoader)  # noqa: S506 - SafeLoader subclass, tags are data
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid yaml: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    tree.update(overrides or {})
    return _resolve(tree)


# ----------------------------------------------------------------------------------------------
# dtype / device


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(f"unsupported dtype {dtype}; use fp32, fp16 or bf16")
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16") from None


def device_stream(device: torch.device) -> contextlib.AbstractContextManager:
    """A CUDA stream of its own for the calling thread's work on ``device`` (each stage thread
    enters one, so that the LM steps while the flow and vocoder run); nothing on a CPU."""
    if device.type == "cuda":
        # a pool stream is not ordered after the default stream: wait for what start-up queued
        # there (buffers zeroed, tables filled) before this thread's first kernels
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(stream)
    return contextlib.nullcontext()


def to_device(data: Any, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``data`` (a list, or a tensor on the host) on ``device`` without waiting for the work
    already queued there: a plain copy to a GPU waits for its stream, which would stall the LM
    stage's overlap of one step with the host's work for the previous one; this copy is
    ordered on the stream like a kernel, from pinned memory that the caching host allocator
    keeps until the copy is done."""
    tensor = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()  # a copy from pageable memory may still wait for the stream
    return tensor.to(device, non_blocking=True)


def settle(device: torch.device) -> None:
    """Wait until the calling thread's work on ``device`` is done: for tensors made once and then
    read by every stage thread, each on its own stream (which nothing else orders after this
    one's work)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def stream_event(device: torch.device) -> torch.cuda.Event | None:
    """An event after the calling thread's work on ``device`` so far (None on a CPU), for
    another stage thread that reads what that work wrote (see :func:`wait_for`)."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).record_event()


def wait_for(events: list, device: torch.device, tensors: list[torch.Tensor]) -> None:
    """Order the calling thread's stream on ``device`` after ``events`` (another thread's work:
    kernels run asynchronously, so a tensor handed over may not be written yet), and mark
    ``tensors`` as used on it, so that the allocator does not give their memory back to the
    producing stream before this stream is done with them.  A consumer on the CPU (a vocoder
    there, the flow on a GPU) waits for the events themselves."""
    if device.type != "cuda":
        for event in events:
            if event is not None:
                event.synchronize()
        return
    stream = torch.cuda.current_stream(device)
    for event in events:
        stream.wait_event(event)
    for tensor in tensors:
        if tensor.device.type == "cuda":
            tensor.record_stream(stream)


def memory_available(device: torch.device) -> int:
    """What ``device`` has free now: a GPU's free memory, or for a CPU the machine's available
    memory, less where a container's cgroup allows less (its limit less its usage: what a pod's
    memory limit leaves), so that a budget taken from it after loading the model cannot get the
    process killed."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            texts = Path(limit).read_text().strip(), Path(usage).read_text().strip()
        except OSError:
            continue
        if all(t.isdigit() for t in texts):  # "max" (v2) is no limit; v1 says none with a huge number
            free = min(free, int(texts[0]) - int(texts[1]))
    return max(free, 0)


def resolve_device(device: str | torch.device | None) -> torch.device:
    device = torch.device(device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but CUDA is not available")
    if device.type not in ("cpu", "cuda", "meta"):
        raise ConfigError(f"unsupported device {device}; use cpu or cuda")
    return device


# ----------------------------------------------------------------------------------------------
# LM config


# Qwen2.5-0.5B shape used by CosyVoice-BlankEN (FACTS 1); the checkpoint shapes force these.
REAL_QWEN2: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


@dataclass
class LLMConfig:
    llm_input_size: int = 896
    llm_output_size: int = 896
    speech_token_size: int = 6561
    mix_ratio: tuple[int, int] = (5, 15)  # text rows : speech tokens per bistream group
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1
    qwen: dict[str, Any] = field(default_factory=lambda: dict(REAL_QWEN2))

    # Ids derived from speech_token_size (6561 codes, then eos, an unused id, fill).
    sos: int = 0
    task_id: int = 1

    @property
    def eos_token(self) -> int:
        return self.speech_token_size

    @property
    def fill_token(self) -> int:
        return self.speech_token_size + 2

    @property
    def stop_token_ids(self) -> tuple[int, int, int]:
        return (self.speech_token_size, self.speech_token_size + 1, self.speech_token_size + 2)

    @property
    def vocab_out(self) -> int:
        """Rows of ``speech_embedding`` and outputs of ``llm_decoder``."""
        return self.speech_token_size + 3

    def qwen2_config(self):
        """A ``transformers.Qwen2Config`` (sdpa attention, as the official backbone runs)."""
        from transformers import Qwen2Config

        cfg = Qwen2Config(**{k: v for k, v in self.qwen.items() if k not in ("architectures",)})
        cfg._attn_implementation = "sdpa"
        if not cfg.use_sliding_window:
            cfg.sliding_window = None  # unused; avoids transformers' sdpa sliding-window warning
        if cfg.hidden_size != self.llm_input_size or cfg.hidden_size != self.llm_output_size:
            raise ConfigError(
                f"Qwen2 hidden_size {cfg.hidden_size} != llm_input_size/llm_output_size "
                f"{self.llm_input_size}/{self.llm_output_size}"
            )
        return cfg

    @classmethod
    def from_yaml(cls, tree: dict[str, Any], qwen: dict[str, Any] | None = None) -> LLMConfig:
        """From ``read_model_yaml`` output (the ``llm:`` entry); ``qwen`` from BlankEN's config.json."""
        llm = tree.get("llm")
        if not isinstance(llm, dict):
            raise ConfigError("cosyvoice2.yaml: no 'llm' entry")
        if llm.get("__new__", "").rsplit(".", 1)[-1] != "Qwen2LM":
            raise ConfigError(f"cosyvoice2.yaml: llm is {llm.get('__new__')!r}, expected a Qwen2LM")
        sampling = llm.get("sampling") or {}
        defaults = cls()
        mix = llm.get("mix_ratio", defaults.mix_ratio)
        return cls(
            llm_input_size=int(llm.get("llm_input_size", defaults.llm_input_size)),
            llm_output_size=int(llm.get("llm_output_size", defaults.llm_output_size)),
            speech_token_size=int(llm.get("speech_token_size", defaults.speech_token_size)),
            mix_ratio=(int(mix[0]), int(mix[1])),
            top_p=float(sampling.get("top_p", defaults.top_p)),
            top_k=int(sampling.get("top_k", defaults.top_k)),
            win_size=int(sampling.get("win_size", defaults.win_size)),
            tau_r=float(sampling.get("tau_r", defaults.tau_r)),
            qwen=dict(qwen) if qwen is not None else dict(REAL_QWEN2),
        )

    @classmethod
    def from_tiny_json(cls, data: dict[str, Any]) -> LLMConfig:
        """From the fixtures' ``config_tiny.json`` (its ``llm`` and ``qwen2_config`` entries)."""
        llm, sampling = data["llm"], data["llm"].get("sampling", {})
        return cls(
            llm_input_size=int(llm["llm_input_size"]),
            llm_output_size=int(llm["llm_output_size"]),
            speech_token_size=int(llm["speech_token_size"]),
            mix_ratio=tuple(llm["mix_ratio"]),
            top_p=float(sampling.get("top_p", 0.8)),
            top_k=int(sampling.get("top_k", 25)),
            win_size=int(sampling.get("win_size", 10)),
            tau_r=float(sampling.get("tau_r", 0.1)),
            qwen=dict(data["qwen2_config"]),
            sos=int(llm.get("sos", 0)),
            task_id=int(llm.get("task_id", 1)),
        )


# ----------------------------------------------------------------------------------------------
# model directory


class ModelDir:
    """Locates the files of a CosyVoice2-0.5B directory; each accessor fails with a clear message."""

    YAML = "cosyvoice2.yaml"
    QWEN_DIR = "CosyVoice-BlankEN"

    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"model directory not found: {root}")
        self.root = root.resolve()

    def __repr__(self) -> str:
        return f"ModelDir({str(self.root)!r})"

    def _file(self, name: str) -> Path:
        path = self.root / name
        if not path.is_file():
            raise ConfigError(f"{self.root}: missing {name} (not a complete CosyVoice2 model directory?)")
        return path

    @property
    def yaml_path(self) -> Path:
        return self._file(self.YAML)

    @property
    def llm_pt(self) -> Path:
        return self._file("llm.pt")

    @property
    def flow_pt(self) -> Path:
        return self._file("flow.pt")

    @property
    def hift_pt(self) -> Path:
        return self._file("hift.pt")

    @property
    def spk2info_pt(self) -> Path:
        return self._file("spk2info.pt")

    @property
    def campplus_onnx(self) -> Path:
        return self._file("campplus.onnx")

    @property
    def speech_tokenizer_onnx(self) -> Path:
        return self._file("speech_tokenizer_v2.onnx")

    @property
    def qwen_dir(self) -> Path:
        path = self.root / self.QWEN_DIR
        if not path.is_dir():
            raise ConfigError(f"{self.root}: missing {self.QWEN_DIR}/ (Qwen2 config and tokenizer)")
        return path

    def missing(self) -> list[str]:
        """Names of the required entries that are absent (empty for a complete directory)."""
        names = [self.YAML, "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx"]
        out = [n for n in names if not (self.root / n).is_file()]
        if not (self.root / self.QWEN_DIR).is_dir():
            out.append(self.QWEN_DIR + "/")
        return out

    def read_yaml(self) -> dict[str, Any]:
        return read_model_yaml(self.yaml_path, {"qwen_pretrain_path": str(self.root / self.QWEN_DIR)})

    def qwen_config_dict(self) -> dict[str, Any]:
        """BlankEN's config.json as a dict (local file only; nothing is downloaded)."""
        path = self.qwen_dir / "config.json"
        if not path.is_file():
            raise ConfigError(f"{self.qwen_dir}: missing config.json")
        return json.loads(path.read_text(encoding="utf-8"))

    def llm_config(self) -> LLMConfig:
        return LLMConfig.from_yaml(self.read_yaml(), qwen=self.qwen_config_dict())
