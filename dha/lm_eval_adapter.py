"""lm-evaluation-harness (EleutherAI's `lm_eval`) on our Transformer: the `DHALM` adapter and `run_tasks`.

`DHALM` answers lm_eval's three kinds of request with the rules of lm_eval's own HFLM:
- loglikelihood (multiple choice): context + continuation, cut to its last max_length + 1 tokens,
  run as one causal sequence; the continuation's log-probabilities are summed, and "greedy" says
  whether argmax reproduces it. Only the rows that predict the continuation are scored, and only
  at the target tokens: log p = logit[target] - logsumexp(logits), the logsumexp computed in
  float32 over `logit_rows` rows at a time, so no (batch, length, vocabulary) float32 log-softmax
  is ever made (at a 128k vocabulary and 2,048 tokens that is 1 GiB per sequence).
- loglikelihood_rolling (perplexity of whole documents): lm_eval's rolling windows of max_length
  tokens (`get_rolling_token_windows` with context 1, made disjoint), scored as above and summed.
- generate_until: greedy decoding from the KV cache. A context longer than max_length minus the
  tokens to generate keeps its LAST tokens (left truncation); decoding stops at the EOS token or
  as soon as the text holds one of the `until` strings, and the text is cut before it.

lm_eval is an optional dependency (`pip install lm-eval`): importing this module without it raises
a UserError saying so, which `dha eval --tasks` reports as its one line.

RULER (lm-eval's tasks/ruler) builds its own prompts, sized in tokens to each of the task metadata's
`max_seq_lengths` by a Hugging Face tokenizer that lm-eval loads by name: `run_tasks` saves the
model's own tokenizer to a temporary folder and names that folder, so nothing comes from a hub. It
runs only the RULER tasks that need no download (RULER_OFFLINE), with the hubs set offline, and
checks up front what they need (`lm-eval[ruler]`: nltk and wonderwords), each missing piece one
UserError; NLTK's punkt_tab data, which lm-eval would download, is not needed (punkt_tab_stand_in).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile

import torch

from .errors import UserError

try:
    from lm_eval import simple_evaluate
    from lm_eval import tasks as lm_eval_tasks
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager
except ImportError:
    raise UserError("--tasks needs lm-evaluation-harness: pip install lm-eval") from None
from tqdm.auto import tqdm


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """logits (n, V) of the positions that predict targets (n,) -> log p(target) (n,), float32.

    The target's logit minus the row's logsumexp, computed `rows` rows at a time in float32: at most
    rows x V float32 values exist at once, never a log-softmax of the whole (n, V)."""
    picked = logits.gather(-1, targets[:, None])[:, 0].float()
    norms = [torch.logsumexp(logits[i : i + rows].float(), dim=-1) for i in range(0, logits.shape[0], rows)]
    return picked - torch.cat(norms)


class DHALM(TemplateLM):
    """A `dha.checkpoint.Loaded` model (with its tokenizer) as an lm_eval LM (module doc)."""

    def __init__(
        self, loaded, batch_size: int = 8, max_length: int = 2048, progress: bool = True, logit_rows: int = 64
    ):
        super().__init__()
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.source} has no tokenizer, so lm-eval tasks cannot run on it")
        if loaded.tokenizer.eos_token_id is None:
            raise UserError(f"the tokenizer of {loaded.source} has no EOS token, which lm-eval needs")
        self.model, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        cfg = self.model.config
        # learned absolute positions end at max_position_embeddings; RoPE models take max_length as given
        self.max_length = min(max_length, cfg.max_position_embeddings) if cfg.position == "learned" else max_length
        self.batch_size, self.progress, self.logit_rows = batch_size, progress, logit_rows
        self.model_device = next(self.model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "dha")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    # ---- scoring --------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum log p(continuation | context), greedy?)."""
        seqs = [(context + cont)[-(self.max_length + 1) :] for context, cont in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))  # similar lengths batch together
        out: list[tuple[float, bool]] = [None] * len(pairs)
        bar = tqdm(
            range(0, len(order), self.batch_size),
            desc="lm-eval",
            disable=disable_tqdm or not self.progress,
            file=sys.stderr,
        )
        for start in bar:
            idx = order[start : start + self.batch_size]
            T = max(len(seqs[i]) - 1 for i in idx)
            ids = torch.zeros(len(idx), T, dtype=torch.long)  # (B, T); right padding leaves earlier positions alone
            for row, i in enumerate(idx):
                ids[row, : len(seqs[i]) - 1] = torch.tensor(seqs[i][:-1])
            logits = self.model(ids.to(self.model_device))  # (B, T, V)
            for row, i in enumerate(idx):
                n, L = len(pairs[i][1]), len(seqs[i]) - 1
                if n > L:
                    raise UserError(
                        f"an lm-eval continuation of {n} tokens is longer than "
                        f"the {self.max_length}-token maximum length"
                    )
                rows = logits[row, L - n : L]  # (n, V): the positions that predict the continuation
                target = torch.tensor(seqs[i][L + 1 - n :], device=rows.device)
                lp = target_logprobs(rows, target, self.logit_rows)
                out[i] = (float(lp.sum()), bool((rows.argmax(-1) == target).all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self.score([(context, cont) for _, context, cont in requests], disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(lm_utils.make_disjoint_window(w))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, self.score(windows, disable_tqdm)):
            totals[r] += lp
        return totals

    # ---- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def greedy_until(self, ids: list[int], max_new: int, until: list[str]) -> str:
        """Greedy continuation of `ids` from the KV cache, stopped at EOS or at the first `until` string."""
        if max_new < 1:
            return ""
        cache = self.model.new_cache(1, len(ids) + max_new)
        logits = self.model(torch.tensor([ids], device=self.model_device), cache, last_only=True)[:, -1]
        new: list[int] = []
        while True:
            token = int(logits.argmax(-1))
            if token == self.eot_token_id:
                break
            new.append(token)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if len(new) == max_new or any(stop in text for stop in until):
                break
            logits = self.model(torch.tensor([[token]], device=self.model_device), cache)[:, -1]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cuts = [text.index(stop) for stop in until if stop in text]
        return text[: min(cuts)] if cuts else text

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        bar = tqdm(
            [r.args for r in requests],
            desc="lm-eval generate",
            disable=disable_tqdm or not self.progress,
            file=sys.stderr,
        )
        for context, gen_kwargs in bar:
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise UserError("this lm-eval adapter decodes greedily only: the task asks for sampling")
            until = gen_kwargs.get("until") or []
            until = [s for s in ([until] if isinstance(until, str) else until) if s]
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            if max_new >= self.max_length:
                raise UserError(
                    f"lm-eval asks for {max_new} new tokens, not fewer than the {self.max_length}-token maximum length"
                )
            ids = self.tok_encode(context)[-(self.max_length - max_new) :] or [
                self.prefix_token_id
            ]  # keep the LAST tokens
            results.append(self.greedy_until(ids, max_new, until))
        return results


# ---- RULER ------------------------------------------------------------------------------------

# The RULER tasks whose haystack and needles are made here: a repeated sentence (niah_single_1),
# needle-shaped noise (niah_multikey_2/3), variable chains (vt), random words (cwe, fwe).
RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
ESSAYS = "the Paul Graham essays haystack, Hugging Face dataset baber/paul_graham_essays"
RULER_DOWNLOADS = {
    name: ESSAYS for name in ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multiquery", "niah_multivalue")
}
RULER_DOWNLOADS |= {
    "ruler_qa_squad": "SQuAD 2.0 from rajpurkar.github.io",
    "ruler_qa_hotpot": "HotpotQA from huggingface.co",
}
RULER_GROUPS = ("ruler", "longcxt")  # lm-eval's group of all 13 and its long-context tag
RULER_DEFAULT_LENGTHS = [4096]  # lm-eval's own default max_seq_lengths
# A RULER sample is at most max_seq_length tokens counting the answer's 128; lm-eval then appends an
# answer prefix ("The special magic number for ... is", about 20 tokens): the model gets this many
# tokens above the longest length, so no prompt is cut.
RULER_SLACK = 64


def ruler_tasks(tasks: list[str]) -> list[str]:
    """The RULER tasks among `tasks` (its group and tag expanded)."""
    known = (*RULER_OFFLINE, *RULER_DOWNLOADS)
    return [n for t in tasks for n in (known if t in RULER_GROUPS else (t,)) if n in known]


def check_ruler(names: list[str]) -> None:
    """UserError (one line, what to do) when a RULER task needs a download or a missing dependency."""
    online = [n for n in names if n in RULER_DOWNLOADS]
    if online:
        raise UserError(
            f"RULER task {online[0]} needs a download ({RULER_DOWNLOADS[online[0]]}) and does not run offline; "
            f"the offline ones: {', '.join(RULER_OFFLINE)}"
        )
    try:  # imported only to check that they are installed (and import)
        import nltk  # noqa: F401
        import wonderwords  # noqa: F401
    except ImportError as e:
        raise UserError(f'RULER tasks need {e.name or "nltk and wonderwords"}: pip install "lm-eval[ruler]"') from None
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("nltk")) < Version("3.9.1"):  # lm-eval asserts it on import
        raise UserError(f'RULER tasks need nltk >= 3.9.1, not {version("nltk")}: pip install -U "lm-eval[ruler]"')


def ruler_metadata(loaded, metadata: dict, folder: str) -> dict:
    """The task metadata for RULER: max_seq_lengths checked (lm-eval's default when absent) and the
    model's own tokenizer, saved to `folder`, as the tokenizer lm-eval builds the prompts with."""
    given = [k for k in ("tokenizer", "pretrained", "model") if k in metadata]
    if given:
        raise UserError(
            f"task metadata {given[0]!r}: RULER prompts are sized with the model's own tokenizer; leave it out"
        )
    lengths = metadata.get("max_seq_lengths", RULER_DEFAULT_LENGTHS)
    if not (isinstance(lengths, list) and lengths and all(type(n) is int and n > 0 for n in lengths)):
        raise UserError(f"task metadata max_seq_lengths must be a list of positive token counts, not {lengths!r}")
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.source} has no tokenizer, so lm-eval tasks cannot run on it")
    loaded.tokenizer.save_pretrained(folder)
    return {**metadata, "max_seq_lengths": lengths, "tokenizer": folder}


@contextlib.contextmanager
def punkt_tab_stand_in(folder: str):
    """lm-eval's RULER module downloads NLTK's punkt_tab data when it is imported and finds none, yet
    only the essay haystack (never offline: check_ruler refuses it) splits sentences with it: without the real
    data, an empty stand-in folder is on nltk's path for the duration, so nothing is downloaded (a
    sentence split would fail loudly on it, never quietly)."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        present = True
    except LookupError:
        present = False
        os.makedirs(os.path.join(folder, "tokenizers", "punkt_tab"))
        nltk.data.path.append(folder)
    try:
        yield
    finally:
        if not present:
            nltk.data.path.remove(folder)


@contextlib.contextmanager
def hubs_offline():
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set for the duration (what reads them late stays off the network)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(dict.fromkeys(saved, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def parse_task_metadata(task_metadata: dict | str | None) -> dict:
    """--task-metadata: a JSON object (string) or a dict; {} when absent."""
    if isinstance(task_metadata, str):
        try:
            task_metadata = json.loads(task_metadata)
        except json.JSONDecodeError as e:
            raise UserError(f"--task-metadata is not JSON: {e}") from None
    if not isinstance(task_metadata, (dict, type(None))):
        raise UserError(
            f'--task-metadata must be a JSON object such as {{"max_seq_lengths": [4096]}}, not {task_metadata!r}'
        )
    return dict(task_metadata or {})


def ruler_setup(stack: contextlib.ExitStack, loaded, names: list[str], metadata: dict) -> dict:
    """Everything RULER needs offline, checked and entered on `stack`: the task metadata to use."""
    check_ruler(names)
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="dha-ruler-"))
    stack.enter_context(hubs_offline())
    stack.enter_context(punkt_tab_stand_in(os.path.join(folder, "nltk_data")))
    return ruler_metadata(loaded, metadata, os.path.join(folder, "tokenizer"))


def task_manager(include_path: str | None, metadata: dict, ruler_only: bool) -> TaskManager:
    """lm-eval's task index: of every built-in task (seconds of YAML parsing), or, when only RULER
    tasks are asked for, of lm-eval's RULER folder alone (plus `include_path`)."""
    ruler_dir = os.path.join(os.path.dirname(lm_eval_tasks.__file__), "ruler")
    if ruler_only and os.path.isdir(ruler_dir):
        paths = [ruler_dir] + ([include_path] if include_path else [])
        return TaskManager(include_path=paths, include_defaults=False, metadata=metadata or None)
    return TaskManager(include_path=include_path, metadata=metadata or None)


# ---- running tasks --------------------------------------------------------------------------------


def run_tasks(
    loaded,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    progress: bool = True,
    task_metadata: dict | str | None = None,
) -> dict:
    """Run lm-evaluation-harness tasks on one model; returns {task: {metric: value}}.

    Standard tasks download their datasets from a hub; offline, point `include_path` at a folder
    of task YAML files whose `dataset_path: json` reads a local JSONL (`dataset_kwargs.data_files`).
    `task_metadata` (a JSON object, or its text) goes to every task, as lm-eval's `--metadata`; RULER
    tasks read `max_seq_lengths` from it, and run offline with the model's tokenizer (module doc):
    max_length is raised to the longest of them plus RULER_SLACK, and a RULER score is reported per
    length (key "2048": the mean of string_match_all over the samples of that length)."""
    metadata, ruler = parse_task_metadata(task_metadata), ruler_tasks(tasks)
    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"--include-path {include_path} is not a directory")
    with contextlib.ExitStack() as stack:
        if ruler:
            metadata = ruler_setup(stack, loaded, ruler, metadata)
            max_length = max(max_length, max(metadata["max_seq_lengths"]) + RULER_SLACK)
        lm = DHALM(loaded, batch_size, max_length, progress)
        if ruler and lm.max_length < max_length:
            raise UserError(
                f"RULER at {max(metadata['max_seq_lengths'])} tokens needs a {max_length}-token context; "
                f"{loaded.source} has {lm.max_length} positions"
            )
        manager = task_manager(
            include_path, metadata, ruler_only=bool(ruler) and all(t in ruler or t in RULER_GROUPS for t in tasks)
        )
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise UserError(f"unknown lm-eval task(s) {unknown}; with local tasks, give --include-path DIR")
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        try:
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=False,
                bootstrap_iters=0,
            )
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"lm-eval could not run {tasks}: {str(e).splitlines()[0]}") from None
    # RULER reports -1 at the lengths it has no samples of (the ones not in max_seq_lengths): left out
    return {
        task: {
            k.split(",")[0]: v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and k != "alias" and not (k.split(",")[0].isdigit() and v == -1)
        }
        for task, metrics in out["results"].items()
    }
