"""The ``qdlm`` model for lm-evaluation-harness: masked diffusion LMs, original or quantized.

    lm_eval --model qdlm --model_args pretrained=DIR,mc_num=32,batch_size=32 --tasks ...

lm-eval's own command line cannot import third-party models, so run it through this module, which
registers ``qdlm`` and adds the bundled tasks' folder to ``--include_path``:

    python -m qdlm_export.eval.lm_eval_model --model qdlm --model_args pretrained=DIR --tasks qdlm_stdlib_mc

From Python, ``import qdlm_export.eval.lm_eval_model`` registers the name (``qdlm-export eval`` and
:func:`qdlm_export.eval.evaluate.evaluate_checkpoint` do that for you).

* ``loglikelihood`` - the Monte-Carlo estimate of ``log p(continuation | context)``
  (:func:`qdlm_export.eval.likelihood.loglikelihood`): LLaDA's estimator for unshifted models,
  Dream's (with shifted logits, EOS appended to the answer as Dream's harness does) for shifted
  ones; ``estimator=`` overrides. Every request uses the same ``seed``, so the choices of one
  question are scored with the same masks (common random numbers: less noise in their ranking).
* ``generate_until`` - diffusion sampling (:mod:`qdlm_export.eval.generation`), LLaDA's sampler or
  Dream's by family, or for block-diffusion families (LLaDA2) the model's own ``generate``
  (:mod:`qdlm_export.eval.block_sampler`), or for uniform-noise families (DiffusionGemma) the model's
  own canvas sampler with its published generation config (:mod:`qdlm_export.eval.canvas_sampler`);
  the text is cut at the first EOS and then at the first stop sequence. Forward passes and generated
  tokens are counted per task (``generation_counts``; ``forward_passes_per_token`` in the eval table).
* ``loglikelihood_rolling`` - the same Monte-Carlo bound over rolling windows of the text, each
  window conditioned on the tokens before it (on EOS for the first one).

A model without a mask token (DiffusionGemma) has no masked likelihood: both likelihood requests
raise :func:`~qdlm_export.eval.canvas_sampler.likelihood_refusal` naming the tasks.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm import tqdm

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .block_sampler import PUBLISHED_DEFAULTS, ForwardCounter, block_generate, block_length_of, generated_length
from .canvas_sampler import (CANVAS_SAMPLER, canvas_generate, eos_ids, has_mask_token, likelihood_refusal,
                             uses_canvas_sampler)
from .generation import dllm_settings, dream_generate, llada_generate
from .likelihood import loglikelihood as mc_loglikelihood
from .loading import load_model, load_tokenizer

logger = logging.getLogger(__name__)

MODEL_NAME = "qdlm"


def _register(cls):
    """``register_model(MODEL_NAME)``, tolerating a second registration (a re-imported module, or this
    file run as ``__main__``): lm-eval refuses two different classes under one name."""
    try:
        return register_model(MODEL_NAME)(cls)
    except ValueError:
        logger.debug("lm-eval already has a %r model; keeping the first registration", MODEL_NAME)
        return cls


@_register
class QdlmLM(LM):
    """lm-eval model for masked diffusion LMs (LLaDA and Dream families, original or quantized).

    Arguments (``--model_args`` keys): ``pretrained`` (a folder or Hub id; or pass ``model=`` and
    ``tokenizer=`` objects from Python), ``mc_num`` (masked copies per likelihood, default 128),
    ``batch_size`` (copies per forward pass; ``mc_num`` must be a multiple for LLaDA's estimator),
    ``estimator`` (``auto`` | ``llada`` | ``dream``), ``seed``; generation: ``sampler`` (``auto`` |
    ``llada`` | ``dream`` | ``llada2`` | ``canvas``), ``gen_length`` (default: the task's ``max_gen_toks``), ``steps``
    (default: ``gen_length``), ``block_length`` (default: ``gen_length``), ``temperature``,
    ``cfg_scale``, ``remasking`` (LLaDA); ``alg`` (default ``entropy``), ``alg_temp``, ``top_p``,
    ``top_k``, ``eps`` (Dream); ``canvas`` (the default for uniform-noise families, DiffusionGemma:
    ``model.generate`` with the checkpoint's generation config, only ``max_new_tokens`` set, from the
    task's ``max_gen_toks`` or ``gen_length``); ``threshold``, ``minimal_topk``, ``eos_early_stop``
    (``llada2``: the model's own block sampler, the default for block-diffusion families, where
    ``block_length`` defaults to the family's and ``steps``, per block, to 32); ``gen_batch_size`` (prompts of equal
    length sampled together); ``max_length`` (prompt + answer tokens; longer prompts are cut on the left); ``dtype``,
    ``device``; ``check_greedy`` (decode each continuation greedily to fill ``is_greedy``; off by
    default as it costs one forward pass per continuation token).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        mc_num: int = 128,
        batch_size: int | str | None = 32,
        estimator: str = "auto",
        seed: int = 1234,
        sampler: str = "auto",
        gen_length: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        temperature: float | None = None,
        cfg_scale: float = 0.0,
        remasking: str = "low_confidence",
        alg: str = "entropy",
        alg_temp: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        eps: float = 1e-3,
        threshold: float = PUBLISHED_DEFAULTS["threshold"],
        minimal_topk: int = PUBLISHED_DEFAULTS["minimal_topk"],
        eos_early_stop: bool = PUBLISHED_DEFAULTS["eos_early_stop"],
        gen_batch_size: int = 8,
        max_length: int | None = None,
        dtype: str | None = "auto",
        device: str | None = None,
        check_greedy: bool = False,
        trust_remote_code: bool = True,
        max_batch_size: int | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            logger.warning("qdlm: ignoring unknown model arguments %s", sorted(unused))
        if model is None and pretrained is None:
            raise ValueError("the qdlm model needs pretrained=DIR (or model= and tokenizer=)")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            logger.warning("qdlm: no CUDA device here, running on the CPU (device=%s was asked for)", device)
            device = "cpu"
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(device)
        if model is None:
            model = load_model(pretrained, dtype=dtype, device=self._device, trust_remote_code=trust_remote_code)
        else:
            self._device = next(model.parameters()).device
        self.model = model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(pretrained, trust_remote_code=trust_remote_code)
        self.pretrained = str(pretrained) if pretrained is not None else getattr(
            getattr(model, "config", None), "_name_or_path", "model"
        )
        if has_mask_token(self.model):
            self.mask_token_id, self.logits_shift = dllm_settings(self.model)
        else:  # uniform noise: no masked likelihood; generation runs the model's canvas sampler
            self.mask_token_id, self.logits_shift = None, False

        self.mc_num = int(mc_num)
        bs = 32 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.batch_size = max(1, min(bs, self.mc_num))
        if estimator == "auto":
            estimator = "dream" if self.logits_shift else "llada"
        if estimator not in ("llada", "dream"):
            raise ValueError(f"estimator must be auto, llada or dream, got {estimator!r}")
        if estimator == "llada" and self.mc_num % self.batch_size:
            from ..errors import ConfigError

            raise ConfigError(
                f"--mc-num {self.mc_num} must be a multiple of --batch-size {self.batch_size} (LLaDA's estimator)",
                hint=f"use --batch-size {self.batch_size} with --mc-num {self.mc_num + -self.mc_num % self.batch_size}, "
                f"or a --batch-size that divides {self.mc_num}",
            )
        self.estimator = estimator
        self.seed = int(seed)

        self.family_block_length = block_length_of(self.model)
        canvas = uses_canvas_sampler(self.model)
        if sampler == "auto":
            sampler = CANVAS_SAMPLER if canvas else "llada2" if self.family_block_length else (
                "dream" if self.logits_shift else "llada")
        if sampler not in ("llada", "dream", "llada2", CANVAS_SAMPLER):
            raise ValueError(f"sampler must be auto, llada, dream, llada2 or canvas, got {sampler!r}")
        if (sampler == CANVAS_SAMPLER) != canvas or (self.mask_token_id is None and sampler != CANVAS_SAMPLER):
            from ..errors import ConfigError

            raise ConfigError(
                f"-O sampler={sampler} does not fit this model: " + (
                    "the canvas sampler is the own generate() of uniform-noise models (DiffusionGemma)"
                    if sampler == CANVAS_SAMPLER else "it fills mask tokens, and this model has none"),
                hint="leave -O sampler unset (auto picks the family's sampler)",
            )
        self.sampler = sampler
        self.gen_length, self.steps, self.block_length = gen_length, steps, block_length
        self.temperature = temperature  # None: the task's, else 0
        self.cfg_scale, self.remasking = float(cfg_scale), remasking
        self.alg, self.alg_temp, self.top_p, self.top_k, self.eps = alg, alg_temp, top_p, top_k, float(eps)
        self.threshold, self.minimal_topk, self.eos_early_stop = float(threshold), int(minimal_topk), bool(eos_early_stop)
        # {task: [forward passes, generated tokens]} over this model's generate_until calls.
        self.generation_counts: dict[str, list[int]] = {}
        self.gen_batch_size = max(1, int(gen_batch_size))
        self.check_greedy = bool(check_greedy)
        self.max_length = int(max_length) if max_length else self._config_max_length()

        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        self.eos_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos

    # ------------------------------------------------------------------------------ lm-eval plumbing
    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
        # lm-eval's --batch_size/--device arrive in additional_config; a key also given in
        # --model_args (batch_size=32) keeps the model_args value instead of clashing.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def _config_max_length(self) -> int:
        cfg = self.model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg  # multimodal: the text section
        for key in ("max_sequence_length", "max_position_embeddings", "n_positions"):
            value = getattr(cfg, key, None) or getattr(text, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 4096

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.pretrained)).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_name": self.pretrained,
            "qdlm_estimator": self.estimator,
            "qdlm_mc_num": self.mc_num,
            "qdlm_sampler": self.sampler,
        }

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"]) if text else []

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Spaces at the end of the context belong to the continuation (lm-eval's convention).
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        if whole[: len(ctx)] != ctx:  # the tokenizer merged across the boundary: encode separately
            cont = list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
            return ctx, cont
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------------------ likelihood
    def _score(self, prompt: list[int], answer: list[int]) -> float:
        if self.estimator == "dream" and self.eos_token_id is not None:
            answer = answer + [self.eos_token_id]  # Dream's harness scores answer + EOS
        if self.logits_shift and not prompt and self.eos_token_id is not None:
            prompt = [self.eos_token_id]  # the first token has no prediction of its own
        keep = self.max_length - len(answer)
        if keep <= 0:
            raise ValueError(f"a continuation of {len(answer)} tokens does not fit max_length {self.max_length}")
        prompt = prompt[-keep:] if len(prompt) > keep else prompt
        return mc_loglikelihood(
            self.model, prompt, answer, mc_num=self.mc_num, batch_size=self.batch_size,
            mask_token_id=self.mask_token_id, logits_shift=self.logits_shift, estimator=self.estimator,
            seed=self.seed,
        )

    def _is_greedy(self, prompt: list[int], answer: list[int]) -> bool:
        n = len(answer)
        out = self._generate_ids([prompt], gen_length=n, steps=n, block_length=n, temperature=0.0)[0]
        return out == answer

    def _refuse_without_mask(self, requests) -> None:
        if self.mask_token_id is None and requests:
            names = sorted({getattr(r, "task_name", None) or "?" for r in requests})
            raise likelihood_refusal(names, type(self.model).__name__)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._refuse_without_mask(requests)
        results = []
        for req in tqdm(requests, desc="qdlm loglikelihood", disable=disable_tqdm):
            context, continuation = req.args[0], req.args[1]
            prompt, answer = self._encode_pair(context, continuation)
            if not answer:
                results.append((0.0, True))
                continue
            logp = self._score(prompt, answer)
            greedy = self._is_greedy(prompt, answer) if self.check_greedy else False
            results.append((logp, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (logp, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        self._refuse_without_mask(requests)
        prefix = self.eos_token_id if self.eos_token_id is not None else self.mask_token_id
        results = []
        for req in tqdm(requests, desc="qdlm loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args[:1]
            tokens = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            total = 0.0
            windows = get_rolling_token_windows(
                token_list=tokens, prefix_token=prefix, max_seq_len=self.max_length, context_len=1
            )
            for window in map(make_disjoint_window, windows):
                ctx, pred = list(window[0]), list(window[1])
                if pred:
                    total += self._score(ctx, pred)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    # ------------------------------------------------------------------------------ generation
    def _sampling(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        max_toks = int(gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", 256)))
        gen_length = int(self.gen_length or max_toks)
        if self.sampler == CANVAS_SAMPLER:  # everything else comes from the model's generation config
            return {"gen_length": gen_length, "steps": None, "block_length": None, "temperature": None}
        temperature = self._temperature(gen_kwargs)
        if self.sampler == "llada2":  # the published sampler takes any lengths: nothing is rounded
            block_length = int(self.block_length or self.family_block_length or PUBLISHED_DEFAULTS["block_length"])
            steps = int(self.steps or PUBLISHED_DEFAULTS["steps"])
            return {"gen_length": gen_length, "steps": steps, "block_length": block_length, "temperature": temperature}
        block_length = int(self.block_length or gen_length)
        if gen_length % block_length:
            gen_length += block_length - gen_length % block_length
        blocks = gen_length // block_length
        steps = int(self.steps or gen_length)
        if steps % blocks:
            steps += blocks - steps % blocks
        return {"gen_length": gen_length, "steps": steps, "block_length": block_length, "temperature": temperature}

    def _temperature(self, gen_kwargs: dict[str, Any]) -> float:
        if self.temperature is not None:
            return float(self.temperature)
        if gen_kwargs.get("do_sample") is False:
            return 0.0
        return float(gen_kwargs.get("temperature", 0.0) or 0.0)

    def _generate_ids(self, prompts: list[list[int]], **settings: Any) -> list[list[int]]:
        """Generated token ids for prompts of equal length (no padding), cut at the first EOS."""
        return [answer for answer, _ in self._generate_rows(prompts, **settings)]

    def _generate_rows(self, prompts: list[list[int]], *, gen_length: int, steps: int, block_length: int,
                       temperature: float) -> list[tuple[list[int], int]]:
        """``(answer cut at the first EOS, tokens generated up to and including that EOS)`` per prompt."""
        if self.sampler == CANVAS_SAMPLER:
            ends = set(eos_ids(self.model))
            rows = canvas_generate(self.model, prompts, max_new_tokens=gen_length, seed=self.seed)
            cut = [next((i for i, t in enumerate(row) if t in ends), None) for row in rows]
            return [(row, len(row)) if i is None else (row[:i], i + 1) for row, i in zip(rows, cut)]
        if self.sampler == "llada2":
            eos = self.eos_token_id if self.eos_token_id is not None else getattr(self.model.config, "eos_token_id", None)
            rows = block_generate(
                self.model, prompts, gen_length=gen_length, block_length=block_length, steps=steps,
                threshold=self.threshold, minimal_topk=self.minimal_topk, eos_early_stop=self.eos_early_stop,
                temperature=temperature, top_p=self.top_p, top_k=self.top_k, mask_id=self.mask_token_id,
                eos_id=eos, seed=self.seed,
            )
            return [self._cut(row) for row in rows]
        gen = torch.Generator(device=self._device).manual_seed(self.seed)
        x = torch.tensor(prompts, dtype=torch.long)
        if self.sampler == "llada":
            out = llada_generate(
                self.model, x, steps=steps, gen_length=gen_length, block_length=block_length,
                temperature=temperature, cfg_scale=self.cfg_scale, remasking=self.remasking,
                mask_token_id=self.mask_token_id, logits_shift=self.logits_shift, generator=gen,
            )
        else:
            out = dream_generate(
                self.model, x, steps=steps, max_new_tokens=gen_length, eps=self.eps, alg=self.alg,
                temperature=temperature, top_p=self.top_p, top_k=self.top_k, alg_temp=self.alg_temp,
                mask_token_id=self.mask_token_id, logits_shift=self.logits_shift, generator=gen,
            )
        return [self._cut(row) for row in out[:, x.shape[1]:].tolist()]

    def _cut(self, row: list[int]) -> tuple[list[int], int]:
        n = generated_length(row, self.eos_token_id, self.mask_token_id)
        if self.eos_token_id is not None and self.eos_token_id in row:
            row = row[: row.index(self.eos_token_id)]
        return [t for t in row if t != self.mask_token_id], n

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # Group requests with the same prompt length and settings, so a batch needs no padding.
        prepared = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            settings = self._sampling(gen_kwargs)
            prompt = self._encode(context)
            keep = self.max_length - settings["gen_length"]
            if keep <= 0:
                raise ValueError(f"gen_length {settings['gen_length']} leaves no room for a prompt in "
                                 f"max_length {self.max_length}")
            prompt = prompt[-keep:]
            if not prompt and self.eos_token_id is not None:
                prompt = [self.eos_token_id]
            prepared.append((i, context, req.args[1], until, settings, prompt, getattr(req, "task_name", None) or ""))
        groups: dict[tuple, list] = {}
        for item in prepared:  # one task per batch: forward passes are counted per task
            key = (item[6], len(item[5]), tuple(sorted(item[4].items())))
            groups.setdefault(key, []).append(item)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="qdlm generate_until", disable=disable_tqdm)
        for items in groups.values():
            for s in range(0, len(items), self.gen_batch_size):
                chunk = items[s : s + self.gen_batch_size]
                with ForwardCounter(self.model) as counter:
                    rows = self._generate_rows([it[5] for it in chunk], **chunk[0][4])
                counts = self.generation_counts.setdefault(chunk[0][6], [0, 0])
                counts[0] += counter.passes
                counts[1] += sum(n for _, n in rows)
                for it, (toks, _) in zip(chunk, rows):
                    text = self.tokenizer.decode(toks, skip_special_tokens=True)
                    for stop in it[3]:
                        if stop:
                            text = text.split(stop)[0]
                    results[it[0]] = text
                    self.cache_hook.add_partial("generate_until", (it[1], it[2]), text)
                bar.update(len(chunk))
        bar.close()
        return [r if r is not None else "" for r in results]


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``qdlm`` model registered and the bundled tasks included."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    from .tasks import tasks_dir

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args and not any(a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(tasks_dir())]
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
