"""``bfpo_jax``: the lm-evaluation-harness backend running this package's model.

Registered with the harness's own registry, so after ``import
bfpo_jax.evaluate`` it is made like any backend::

    lm = lm_eval.api.registry.get_model("bfpo_jax").create_from_arg_string(
        "pretrained=PATH,dtype=float32,batch_size=8,max_length=2048")

Tokenisation, truncation and request semantics are the harness's ``hf``
backend's (this class reuses its ``TemplateLM`` base and copies ``HFLM``'s
rules where they live in ``HFLM``), so the same requests give the same
log-likelihoods, greedy flags and greedy generations (tested to 1e-4 in
float32). What differs is how the work runs: requests are sorted by length and
packed several to a row (or padded to a few bucket lengths), log-probs come
from the chunked path, generation uses the KV cache, all on a
``(data, fsdp, tensor)`` mesh (see :mod:`bfpo_jax.evaluate.engine`).
"""

from __future__ import annotations

import json
import logging

import jax
import jinja2
import numpy as np
import transformers
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    configure_pad_token,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from bfpo_jax import sharding
from bfpo_jax.evaluate import batching, loading
from bfpo_jax.evaluate.engine import Engine
from bfpo_jax.model.tokenizer import load_tokenizer
from bfpo_jax.trainable import count_params

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")


@register_model("bfpo_jax")
class BfpoJaxLM(TemplateLM):
  """An ``lm_eval.api.model.LM`` on the Flax Mistral/Llama of this package.

  Args:
    pretrained: an HF folder, a training workdir (its newest checkpoint or
      ``hf_export/``), or a ``(MistralConfig, params)`` pair.
    tokenizer: tokenizer folder (or ``mistral``); default: the model's.
    dtype: ``auto`` | ``float32`` | ``bfloat16`` | ``float16``.
    batch_size: rows per data-parallel device per batch (``auto``: 8).
    max_length: context window in tokens; default the model's
      ``max_position_embeddings``, as the ``hf`` backend.
    data, fsdp, tensor: mesh axis sizes (-1: the remaining devices).
    packing: pack several scoring requests into one row (segment ids);
      False pads each to a bucket length instead. Packing is the default:
      never slower in docs/BENCHMARKS.md, and faster on a first pass (one
      line length, fewer compiled shapes).
    chunk_size: tokens per log-prob chunk.
    decode_segment: tokens decoded between two checks for stop strings.
    seed: PRNG seed for sampled generation.
    add_bos_token, prefix_token_id: as for the ``hf`` backend.
    device, max_batch_size: accepted for command-line compatibility with the
      ``hf`` backend and not used (JAX picks its platform; batch sizes are
      fixed).
  """

  def __init__(self, pretrained, tokenizer=None, dtype="auto",
               batch_size=DEFAULT_BATCH_SIZE, max_length=None, data=1, fsdp=-1,
               tensor=1, packing=True, chunk_size=64, decode_segment=32,
               seed=0, add_bos_token=None, prefix_token_id=None, device=None,
               max_batch_size=None):
    super().__init__()
    del device, max_batch_size
    if str(batch_size).startswith("auto"):
      batch_size = DEFAULT_BATCH_SIZE
    if int(batch_size) < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mesh = sharding.make_mesh(int(data), int(fsdp), int(tensor))
    model = loading.load(pretrained, mesh, dtype=str(dtype),
                         tokenizer=tokenizer)
    self.cfg, self.source = model.cfg, model.source
    self.engine = Engine(model.cfg, model.params, mesh,
                         chunk_size=int(chunk_size),
                         segment=int(decode_segment))
    self.rows_per_batch = int(batch_size) * self.engine.data_parallel
    self.packing, self.seed = bool(packing), int(seed)

    kwargs = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    if model.tokenizer == "mistral" or model.tokenizer.lower().endswith(
        ".gguf"):
      tok = load_tokenizer(model.tokenizer)
      if add_bos_token is not None:
        tok.add_bos_token = add_bos_token
    else:  # as the hf backend loads it
      tok = transformers.AutoTokenizer.from_pretrained(
          model.tokenizer, use_fast=True, trust_remote_code=False, **kwargs)
    self.tokenizer = configure_pad_token(tok)
    if len(self.tokenizer) > self.cfg.vocab_size:
      raise ValueError(f"tokenizer {model.tokenizer}: {len(self.tokenizer)} "
                       f"tokens exceed the model's vocab_size "
                       f"{self.cfg.vocab_size}")
    self.add_bos_token = add_bos_token
    self.custom_prefix_token_id = prefix_token_id
    self._max_length = int(max_length or self.cfg.max_position_embeddings)
    logger.info("bfpo_jax: %s on mesh %s, %s, %d rows per batch, %s",
                self.source, dict(mesh.shape), np.dtype(self.cfg.dtype),
                self.rows_per_batch, "packed" if self.packing else "bucketed")

  # ------------------------------------------------------------ properties
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    if self.custom_prefix_token_id is not None:
      return self.custom_prefix_token_id
    if self.tokenizer.bos_token_id is not None:
      return self.tokenizer.bos_token_id
    return self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return 256

  @property
  def batch_size(self) -> int:
    return self.rows_per_batch

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name_or_path.replace("/", "__")

  # ---------------------------------------------------------- tokenisation
  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    """The ``hf`` backend's rule: the tokenizer's default special tokens,
    none when ``string`` already starts with the BOS text."""
    special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
    if add_special_tokens is None and has_bos_prefix(
        string, self.tokenizer.decode(self.prefix_token_id)):
      special["add_special_tokens"] = False
    encoding = self.tokenizer.encode(string, **special)
    return encoding[-left_truncate_len:] if left_truncate_len else encoding

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def _encode_prompt(self, string: str) -> list[int]:
    """A generation prompt, tokenised as ``hf``'s ``tok_batch_encode``."""
    special = {}
    if has_bos_prefix(string, getattr(self.tokenizer, "bos_token", None)):
      special = {"add_special_tokens": False}
    elif self.add_bos_token is not None:
      special = {"add_special_tokens": self.add_bos_token}
    return self.tokenizer(string, **special)["input_ids"]

  def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
    """The tokenizer's chat template (the one ``hf_export/`` carries)."""
    kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                  continue_final_message=not add_generation_prompt)
    try:
      return self.tokenizer.apply_chat_template(chat_history, **kwargs)
    except jinja2.exceptions.TemplateError:  # e.g. no system role
      logger.warning("chat template failed; retrying without system turns")
      return self.tokenizer.apply_chat_template(
          [m for m in chat_history if m["role"] != "system"], **kwargs)

  # --------------------------------------------------------------- scoring
  def _score_rows(self, rows, what, disable_tqdm):
    """``[(sum of log-probs, all greedy)]`` per row, in the order given."""
    make = (batching.packed_batches if self.packing
            else batching.bucketed_batches)
    scores = [None] * len(rows)
    slots = real = n_batches = 0
    with tqdm(total=len(rows), desc=f"bfpo_jax {what}",
              disable=disable_tqdm or jax.process_index() != 0) as bar:
      for batch in make(rows, self.rows_per_batch, self.max_length):
        logps, greedy = self.engine.score(batch)
        for index, line, start, end in batch.placements:
          scores[index] = (float(logps[line, start:end].sum(dtype=np.float64)),
                           bool(greedy[line, start:end].all()))
        slots += batch.segment_ids.size
        real += int((batch.segment_ids > 0).sum())
        n_batches += 1
        bar.update(len(batch.placements))
    self._log(what, len(rows), n_batches, 1 - real / max(slots, 1))
    return scores

  def _log(self, what, n, n_batches, padding=None):
    shapes = sorted(self.engine.shapes)
    padded = "" if padding is None else f" ({100 * padding:.0f}% padding)"
    logger.info("bfpo_jax %s: %d %s in %d batches%s; %d compiled shapes so "
                "far: %s", what, n, "prompts" if padding is None else "rows",
                n_batches, padded, len(shapes), shapes)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
    rows = [batching.scoring_row(context, continuation, self.max_length)
            for _, context, continuation in requests]
    scores = self._score_rows(rows, "loglikelihood", disable_tqdm)
    for (request, _, _), answer in zip(requests, scores):
      if request is not None:
        self.cache_hook.add_partial("loglikelihood", request, answer)
    return scores

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    """Disjoint windows of ``max_length`` tokens, as the ``hf`` backend makes
    them, all scored in one batched pass."""
    rows, owners = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      windows = lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)
      for context, continuation in map(lm_utils.make_disjoint_window, windows):
        rows.append(batching.scoring_row(context, continuation,
                                         self.max_length))
        owners.append(i)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owners, self._score_rows(
        rows, "loglikelihood_rolling", disable_tqdm)):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # ------------------------------------------------------------ generation
  def _sampling(self, gen_kwargs):
    """``(until, max_gen_toks, temperature, top_p)`` from a request's kwargs."""
    kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    unknown = sorted(set(kwargs) - set(GEN_KWARGS))
    if unknown:
      raise ValueError(f"bfpo_jax: generation argument(s) {unknown} not "
                       f"supported (supported: {', '.join(GEN_KWARGS)})")
    eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
    until = handle_stop_sequences(kwargs["until"], eos=eos)
    max_gen_toks = kwargs["max_gen_toks"]
    if max_gen_toks >= self.max_length:
      raise ValueError(f"max_gen_toks ({max_gen_toks}) must be below "
                       f"max_length ({self.max_length})")
    temperature = float(kwargs["temperature"]) if kwargs["do_sample"] else 0.0
    return until, max_gen_toks, temperature, float(kwargs.get("top_p") or 1.0)

  def _generate_group(self, contexts, gen_kwargs, bar, batch_index):
    until, max_gen_toks, temperature, top_p = self._sampling(gen_kwargs)
    max_prompt = self.max_length - max_gen_toks
    prompts = [self._encode_prompt(c)[-max_prompt:] for c in contexts]
    stops = [s for s in until if s]
    eos = self.eot_token_id
    pad = self.tokenizer.pad_token_id
    out = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    for start in range(0, len(order), self.rows_per_batch):
      chunk = order[start:start + self.rows_per_batch]
      width = batching.bucket_length(len(prompts[chunk[0]]), max_prompt)
      ids = np.full((self.rows_per_batch, width), pad, np.int32)
      mask = np.zeros_like(ids)
      ids[:, -1], mask[:, -1] = self.prefix_token_id, 1  # idle rows
      for line, i in enumerate(chunk):
        ids[line, width - len(prompts[i]):] = prompts[i]
        mask[line, width - len(prompts[i]):] = 1
      active = np.arange(self.rows_per_batch) < len(chunk)

      def finished(line, tokens):
        text = self.tok_decode(tokens)
        return any(s in text for s in stops)

      # Same seed and requests, same samples.
      rng = jax.random.fold_in(jax.random.key(self.seed), batch_index)
      batch_index += 1
      tokens = self.engine.generate(
          ids, mask, max_gen_toks, finished=finished, rng=rng,
          temperature=temperature, top_p=top_p, eos_token_id=eos,
          pad_token_id=pad, active=active)
      for line, i in enumerate(chunk):
        row = list(tokens[line, :max_gen_toks])
        row = row[:row.index(eos)] if eos in row else row
        out[i] = postprocess_generated_text(self.tok_decode(row), until, None)
      bar.update(len(chunk))
    return out, batch_index

  def generate_until(self, requests, disable_tqdm: bool = False):
    """Greedy or sampled continuations up to a stop string, EOS or
    ``max_gen_toks``; requests with the same generation kwargs share
    batches."""
    groups = {}
    for i, req in enumerate(requests):
      key = json.dumps(req.args[1], sort_keys=True, default=str)
      groups.setdefault(key, []).append(i)
    results = [None] * len(requests)
    n_batches = 0
    with tqdm(total=len(requests), desc="bfpo_jax generate_until",
              disable=disable_tqdm or jax.process_index() != 0) as bar:
      for indices in groups.values():
        contexts = [requests[i].args[0] for i in indices]
        texts, n_batches = self._generate_group(
            contexts, requests[indices[0]].args[1], bar, n_batches)
        for i, text in zip(indices, texts):
          results[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    self._log("generate_until", len(requests), n_batches)
    return results

  def get_model_info(self) -> dict:
    return {"model_num_parameters": count_params(self.engine.params),
            "model_dtype": str(np.dtype(self.cfg.dtype)),
            "model_source": self.source}
