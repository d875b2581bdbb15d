"""The eval rule: one model (a trained run, the teacher, or a student's untrained init) on the held-out set
and on lm-evaluation-harness tasks, written as two JSON files of the same shape. Modules: ``loading`` (the
model and its identity), ``heldout`` (held-out metrics), ``harness`` (lm-eval), ``record`` (the rule's
:func:`evaluate_model`); every public name is importable from ``kdflow.evaluate``.

A model is a prepared model's manifest (``kdflow_model.json``, see kdflow.models) plus, for a trained run,
its output directory (a PEFT adapter, kdflow.train). :func:`evaluate_model` writes, atomically:

* ``heldout.json`` (:func:`heldout_metrics`): the model on the teacher's held-out top-k cache
  (``results/cache/<teacher>/topk_k<k>/heldout.parquet``): it reads the teacher's tokens, so its numbers
  are per *teacher* token and directly comparable across the teacher, the inits and the runs:

  - ``nll_per_token`` / ``ppl``: next-token cross-entropy over the real positions (row j predicts token
    j + 1, so a document of n tokens has n − 1 targets), and its exp;
  - ``top1_agreement``: share of the cached rows (all n rows of each document) where the model's argmax
    is the teacher's most probable token;
  - ``kl_teacher_student``: mean over the same rows of the exact KL(teacher ‖ model) over k + 1 buckets
    (the teacher's k cached ids and everything else):
    ``TopKKDLoss(temperature=1, divergence="forward_kl", missing_mass="rest_bucket")``.

  A model whose tokenizer is not the teacher's (``vocab: own`` students) cannot read the cache: its
  perplexity is measured on its own tokenisation of the same documents (kdflow.perplexity, same
  ``max_length``) and top-1 agreement and KL are null, with the reason in ``details``.
  Documents: the first ``max_docs`` rows of the held-out shard (``doc_index < max_docs``; all when
  null), i.e. the same documents ``kdflow.shards.read_texts(heldout, max_docs)`` returns and the
  ``kdflow_heldout`` lm-eval task reads. Each is cut at the cache's ``max_length`` teacher tokens.
* ``lm_eval.json`` (:func:`run_lm_eval`, :func:`lm_eval_metrics`): the configured lm-evaluation-harness
  tasks, run as ``lm_eval --model hf --model_args pretrained=<weights>,peft=<adapter>,dtype=…`` would run
  them. The shipped offline task ``kdflow_heldout`` (resources/lm_eval_tasks/kdflow_heldout.yaml) scores
  the held-out documents' whole texts by rolling log-likelihood: ``word_perplexity``,
  ``byte_perplexity``, ``bits_per_byte``, comparable across tokenizers. lm-eval's whole result dict is
  kept beside it as ``lm_eval_raw.json``.

Both files are one :class:`~kdflow.eval_record.EvalRecord` each (``kdflow.eval_record``, torch-free, the
contract kdflow.results reads them by): ``{"model", "kind" ("run" | "teacher" | "student_init"), "student",
"mode", "seed", "tag", "evaluation" ("heldout" | "lm_eval"), "metrics": [{"task", "metric", "value", "stderr",
"higher_is_better"}, …] (:class:`~kdflow.eval_record.Metric`), "details": {…}, "provenance": {git commit,
package versions, "model": the weights' and adapter's identity}}``.
"""

from kdflow.eval_record import EvalRecord, EvalRecordError, Metric
from kdflow.evaluate.harness import (
    HELDOUT_TASK,
    TASK_TEMPLATE,
    lm_eval_metrics,
    lm_eval_version,
    resolve_include_dir,
    run_lm_eval,
    write_heldout_task_data,
)
from kdflow.evaluate.heldout import HELDOUT_METRICS, ROW_CHUNK, heldout_docs, heldout_metrics
from kdflow.evaluate.loading import EvalError, load_eval_model, model_identity
from kdflow.evaluate.record import evaluate_model
from kdflow.plan import KINDS

__all__ = [
    "HELDOUT_METRICS",
    "HELDOUT_TASK",
    "KINDS",
    "ROW_CHUNK",
    "TASK_TEMPLATE",
    "EvalError",
    "EvalRecord",
    "EvalRecordError",
    "Metric",
    "evaluate_model",
    "heldout_docs",
    "heldout_metrics",
    "lm_eval_metrics",
    "lm_eval_version",
    "load_eval_model",
    "model_identity",
    "resolve_include_dir",
    "run_lm_eval",
    "write_heldout_task_data",
]
