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
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from .errors import UserError

try:
    from lm_eval import simple_evaluate
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
    norms = [torch.logsumexp(logits[i:i + rows].float(), dim=-1) for i in range(0, logits.shape[0], rows)]
    return picked - torch.cat(norms)


class DHALM(TemplateLM):
    """A `dha.checkpoint.Loaded` model (with its tokenizer) as an lm_eval LM (module doc)."""

    def __init__(self, loaded, batch_size: int = 8, max_length: int = 2048, progress: bool = True, logit_rows: int = 64):
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
        seqs = [(context + cont)[-(self.max_length + 1):] for context, cont in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))  # similar lengths batch together
        out: list[tuple[float, bool]] = [None] * len(pairs)
        bar = tqdm(range(0, len(order), self.batch_size), desc="lm-eval", disable=disable_tqdm or not self.progress, file=sys.stderr)
        for start in bar:
            idx = order[start:start + self.batch_size]
            T = max(len(seqs[i]) - 1 for i in idx)
            ids = torch.zeros(len(idx), T, dtype=torch.long)  # (B, T); right padding leaves earlier positions alone
            for row, i in enumerate(idx):
                ids[row, : len(seqs[i]) - 1] = torch.tensor(seqs[i][:-1])
            logits = self.model(ids.to(self.model_device))  # (B, T, V)
            for row, i in enumerate(idx):
                n, L = len(pairs[i][1]), len(seqs[i]) - 1
                if n > L:
                    raise UserError(f"an lm-eval continuation of {n} tokens is longer than the {self.max_length}-token maximum length")
                rows = logits[row, L - n: L]  # (n, V): the positions that predict the continuation
                target = torch.tensor(seqs[i][L + 1 - n:], device=rows.device)
                lp = target_logprobs(rows, target, self.logit_rows)
                out[i] = (float(lp.sum()), bool((rows.argmax(-1) == target).all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self.score([(context, cont) for _, context, cont in requests], disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for w in lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                                        max_seq_len=self.max_length, context_len=1):
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
        bar = tqdm([r.args for r in requests], desc="lm-eval generate", disable=disable_tqdm or not self.progress, file=sys.stderr)
        for context, gen_kwargs in bar:
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise UserError("this lm-eval adapter decodes greedily only: the task asks for sampling")
            until = gen_kwargs.get("until") or []
            until = [s for s in ([until] if isinstance(until, str) else until) if s]
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            if max_new >= self.max_length:
                raise UserError(f"lm-eval asks for {max_new} new tokens, not fewer than the {self.max_length}-token maximum length")
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]  # keep the LAST tokens
            results.append(self.greedy_until(ids, max_new, until))
        return results


def run_tasks(loaded, tasks: list[str], include_path: str | None = None, limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 8, max_length: int = 2048, progress: bool = True) -> dict:
    """Run lm-evaluation-harness tasks on one model; returns {task: {metric: value}}.

    Standard tasks download their datasets from a hub; offline, point `include_path` at a folder
    of task YAML files whose `dataset_path: json` reads a local JSONL (`dataset_kwargs.data_files`)."""
    lm = DHALM(loaded, batch_size, max_length, progress)
    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"--include-path {include_path} is not a directory")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {unknown}; with local tasks, give --include-path DIR")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False, bootstrap_iters=0)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"lm-eval could not run {tasks}: {str(e).splitlines()[0]}") from None
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
            for task, metrics in out["results"].items()}
