"""The teacher caches of a study plan (:class:`CachePlan`, a part of :class:`kdflow.plan.StudyPlan`): their
names and directories, the settings each cache job depends on, their files and indexes.

A study has one logit cache (``teacher_cache.k`` and ``samples``), which carries every run's tokens and the
held-out shard's, the embed cache written by the same jobs, and the hidden-state cache; a run whose
``teacher_logits`` ask for another k or samples adds a logit cache of its own over the training shards (rule
``logit_cache``, no embed file).
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from kdflow.errors import KdflowError

if TYPE_CHECKING:
    from kdflow.runs import RunSpec

CACHE_ROOT = "results/cache"
# The teacher_cache settings every cache job depends on (so that other changes do not rerun one).
COMMON_CACHE_SETTINGS = ("max_length", "batch_size", "rows_per_part", "device", "parallel", "tp_size", "dtype")
CACHE_SETTINGS = {
    "topk": (*COMMON_CACHE_SETTINGS, "k"),
    "hidden": (*COMMON_CACHE_SETTINGS, "hidden_layers", "hidden_token_ratio", "hidden_token_seed", "hidden_dtype"),
}


SYSTEMATIC_SUFFIX = "_sys"


def logit_name(k: int, samples: int, sampling: str = "multinomial") -> str:
    """A logit cache's directory: ``topk_k<k>``, with a sampled tail ``topk_k<k>_s<samples>``, ``_sys`` after it
    when the draws are systematic."""
    systematic = bool(samples) and sampling == "systematic"
    return f"topk_k{k}" + (f"_s{samples}" if samples else "") + SYSTEMATIC_SUFFIX * systematic


def parse_logit_name(name: str) -> tuple[int, int, str]:
    """``(k, samples, sampling)`` of a logit cache's directory name (inverse of :func:`logit_name`)."""
    systematic = name.endswith(SYSTEMATIC_SUFFIX)
    k, _, samples = name.removeprefix("topk_k").removesuffix(SYSTEMATIC_SUFFIX).partition("_s")
    return int(k), int(samples or 0), "systematic" if systematic else "multinomial"


class PlanError(KdflowError, ValueError):
    """A target that is not part of this study (an unknown model, run or cache name)."""


class CachePlan:
    """The caches' part of the plan; the plan gives ``config``, ``teacher``, ``runs`` and ``shard_names``."""

    config: dict[str, Any]
    teacher: str
    runs: dict[str, RunSpec]

    def shard_names(self, with_heldout: bool = True) -> list[str]:
        raise NotImplementedError

    @property
    def cache_cfg(self) -> dict:
        return self.config["teacher_cache"]

    # -- names and directories -------------------------------------------------------------------------------
    @property
    def topk_name(self) -> str:
        """The study's logit cache (teacher_cache.k and samples): it carries every run's tokens, and the held-out
        shard's for evaluation."""
        return logit_name(self.cache_cfg["k"], self.cache_cfg["samples"], self.cache_cfg["sampling"])

    @cached_property
    def extra_logit_names(self) -> tuple[str, ...]:
        """Logit caches of runs whose teacher_logits ask for another k or samples than the study's (training
        shards only, no embed file: rule logit_cache)."""
        names = {self.logits_read(spec) for spec in self.runs.values()}
        return tuple(sorted(names - {self.topk_name}))

    def logits_read(self, spec: RunSpec) -> str:
        """The logit cache whose index a run depends on: its own k and samples for an rb term read from a cache,
        else the study's (which carries the tokens)."""
        logits = spec.teacher_logits
        if "rb" in spec.terms and logits.source == "cache":
            k = self.cache_cfg["k"] if logits.k is None else logits.k
            samples = self.cache_cfg["samples"] if logits.samples is None else logits.samples
            sampling = self.cache_cfg["sampling"] if logits.sampling is None else logits.sampling
            return logit_name(k, samples, sampling)
        return self.topk_name

    @property
    def hidden_name(self) -> str:
        return f"hidden_l{'-'.join(map(str, sorted(self.cache_cfg['hidden_layers'])))}"

    @property
    def cache_dir(self) -> str:
        return f"{CACHE_ROOT}/{self.teacher}"

    def cache_path(self, cache: str) -> str:
        return f"{self.cache_dir}/{cache}"

    def partial_dir(self, cache: str, shard: str) -> str:
        """Finished parts of one unfinished cache job (``shard`` may be the rule's ``{shard}`` wildcard):
        outside the declared outputs, which Snakemake deletes on failure."""
        return f"{CACHE_ROOT}/.partial/{self.teacher}/{cache}/{shard}"

    @property
    def cache_names(self) -> tuple[str, ...]:
        return (self.topk_name, "embed", self.hidden_name, *self.extra_logit_names)

    def cache_settings(self, kind: str) -> dict[str, Any]:
        """The teacher_cache settings a cache rule (``topk`` or ``hidden``) depends on."""
        settings = {k: self.cache_cfg[k] for k in CACHE_SETTINGS[kind]}
        cfg = self.cache_cfg
        if kind == "topk" and cfg["samples"]:  # (absent without a tail: older jobs' params unchanged)
            settings.update(samples=cfg["samples"], sample_seed=cfg["sample_seed"])
            if cfg["sampling"] == "systematic":  # (absent for independent draws: their jobs' params unchanged)
                settings["sampling"] = "systematic"
        if kind == "topk" and cfg["logit_encoding"] != "plain":  # (likewise in the plain encoding)
            settings.update(logit_encoding=cfg["logit_encoding"], logit_floor=cfg["logit_floor"])
        return settings

    def logit_settings(self, name: str) -> dict[str, Any]:
        """The settings of an extra logit cache (rule logit_cache): the study's, with the run's k and samples."""
        if name not in self.extra_logit_names:
            raise PlanError(
                f"{self.cache_path(name)}: no run of this config reads logit cache {name!r} (extra logit caches: "
                f"{', '.join(self.extra_logit_names) or 'none'})"
            )
        k, samples, sampling = parse_logit_name(name)
        tail_keys = ("samples", "sample_seed", "sampling")
        settings = {key: v for key, v in self.cache_settings("topk").items() if key not in tail_keys}
        tail = {"samples": samples, "sample_seed": self.cache_cfg["sample_seed"]} if samples else {}
        if samples and sampling == "systematic":
            tail["sampling"] = sampling
        if samples and "logit_floor" in settings:  # no floor with a tail (the draws exclude the head: config.py)
            settings["logit_floor"] = 0.0
        return {**settings, "k": k, **tail}

    def cache_files(self) -> list[str]:
        main = [f"{self.cache_path(c)}/{s}.parquet" for c in self.cache_names[:3] for s in self.shard_names()]
        training = self.shard_names(with_heldout=False)
        return main + [f"{self.cache_path(c)}/{s}.parquet" for c in self.extra_logit_names for s in training]

    def cache_index_inputs(self, cache: str) -> list[str]:
        """The training shards' files of one cache (the held-out shard's file is for evaluation)."""
        if cache not in self.cache_names:
            raise PlanError(
                f"{self.cache_path(cache)}: not a cache of this config (caches: {', '.join(self.cache_names)})"
            )
        return [f"{self.cache_path(cache)}/{s}.parquet" for s in self.shard_names(with_heldout=False)]
