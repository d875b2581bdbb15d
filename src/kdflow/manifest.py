"""The prepared-model manifest ``resources/models/<name>/kdflow_model.json`` as one typed contract.

:class:`ModelManifest` is what kdflow.prepare writes (``to_json``, through :func:`kdflow.atomic.write_json`) and
what :func:`kdflow.models.read_manifest` reads back (``from_json``, then ``load_path`` resolved against the
manifest's folder). It says where the weights are (``load_path``, ``revision``), how they were made (``origin``:
``gguf`` conversion, ``pruned`` from the teacher, a ``local_dir`` or ``hub`` model as is, with the keys only
that origin has), what the model is (layers, parameters, tokenizer) and its held-out perplexity at preparation.
A student's manifest also names its teacher (:class:`StudentOrigin`). Absent keys (a model prepared without
loading it has no ``num_layers``) read as None and are left out again when written.

No torch here: kdflow.models (which imports torch) and kdflow.cache_format use these types.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

from kdflow.errors import KdflowError
from kdflow.json_types import dataclass_problems

ROLES = ("teacher", "student")
# Per origin: the keys that say how the weights were got, in the order the manifest has always had them, and
# the roles a model of that origin can have.
ORIGIN_KEYS = {
    "gguf": (
        "origin",
        "load_path",
        "revision",
        "source_file",
        "source_hash",
        "source_hash_of",
        "conversion_max_abs_logit_diff",
    ),
    "pruned": ("origin", "load_path", "revision", "keep_layers", "teacher_layers", "source_hash", "source_hash_of"),
    "local_dir": ("load_path", "revision", "origin", "source_hash", "source_hash_of"),
    "hub": ("load_path", "revision", "origin", "source_hash", "source_hash_of"),
}
ORIGIN_ROLES = {"gguf": ("teacher",), "pruned": ("student",), "local_dir": ROLES, "hub": ROLES}
# Keys of one origin only: None (absent) for the others.
_ORIGIN_ONLY = {"source_file", "conversion_max_abs_logit_diff", "keep_layers", "teacher_layers"}
# Measured at preparation when the model (or its tokenizer) was loaded; absent otherwise. Each pair comes together.
_MEASURED = (("num_layers", "num_parameters"), ("tokenizer_fingerprint", "tokenizer_size"))


class ManifestError(KdflowError, ValueError):
    """A manifest that breaks the contract: a missing or unknown key, a value of the wrong type, keys of another
    role or origin. The message lists every fault (and, from :meth:`ModelManifest.from_json`, the file)."""


@dataclass(frozen=True)
class Weights:
    """Where a model's weights are, as ``from_pretrained`` takes them: a local directory (absolute, or relative
    to the current directory) or a hub id, and the hub commit (None for a directory)."""

    load_path: str
    revision: str | None = None


@dataclass(frozen=True, kw_only=True)
class HeldoutPerplexity:
    """The held-out perplexity measured at preparation (kdflow.perplexity over the first ``docs`` documents of
    ``heldout_file``, each cut to ``max_length`` tokens)."""

    ppl: float
    nll_per_token: float
    tokens: int  # next-token targets scored
    docs: int
    heldout_file: str
    max_length: int

    def __post_init__(self) -> None:
        if problems := dataclass_problems(self, "heldout"):
            raise ManifestError("; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> HeldoutPerplexity | None:
        """None for null; a mapping with exactly the fields, else :class:`ManifestError` naming ``where``."""
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ManifestError(f"{where} = {data!r} is not an object or null")
        _check_keys(data, [f.name for f in fields(cls)], [f.name for f in fields(cls)], where)
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class StudentOrigin:
    """What a student's manifest says about its teacher (a teacher's manifest has none of these keys)."""

    teacher: str  # the teacher's name
    teacher_manifest: str  # the teacher's kdflow_model.json, as given to prepare_models
    teacher_heldout: HeldoutPerplexity | None  # the teacher's held-out perplexity, copied from its manifest
    shares_teacher_vocab: bool  # the student reads the teacher's token ids (logit and feature KD possible)
    vocab_mismatch: str | None = None  # why not, when it does not (students[].vocab: own)


_STUDENT_KEYS = tuple(f.name for f in fields(StudentOrigin))


@dataclass(frozen=True, kw_only=True)
class ModelManifest:
    """One prepared model: the contents of ``resources/models/<name>/kdflow_model.json``. Checked when made."""

    name: str  # the model's name in the config (teacher.name, students[].name)
    role: str  # teacher | student
    source: dict[str, Any]  # the config's source of the model (kind, path, revision, keep_layers …)
    student_of: StudentOrigin | None = None  # a student's teacher; None for the teacher
    origin: str  # gguf | pruned | local_dir | hub
    load_path: str  # the weights: "hf" (beside the manifest) for gguf and pruned, an absolute directory, a hub id
    revision: str | None  # the hub commit (hub), else None
    source_hash: str  # what identifies the source weights (source_hash_of says what it hashes)
    source_hash_of: str
    source_file: str | None = None  # gguf: the GGUF file converted
    conversion_max_abs_logit_diff: float | None = None  # gguf: |logits of the GGUF - of the conversion| (0.0)
    keep_layers: tuple[int, ...] | None = None  # pruned: the teacher's decoder layers kept
    teacher_layers: int | None = None  # pruned: the teacher's decoder layers
    num_layers: int | None = None  # decoder layers (when the model was loaded at preparation)
    num_parameters: int | None = None
    tokenizer_fingerprint: str | None = None  # kdflow.models.tokenizer_fingerprint (when the tokenizer was loaded)
    tokenizer_size: int | None = None
    heldout: HeldoutPerplexity | None  # None: no held-out set, or ppl_max_docs 0
    config_hash: str  # of the model's name and source and the prepare settings
    provenance: dict[str, Any]  # git commit and package versions of the preparation

    def __post_init__(self) -> None:
        problems = dataclass_problems(self)
        if not problems:  # the cross-checks read the values: only once their types are right
            problems = self._conflicts()
        if problems:
            raise ManifestError(f"model {self.name!r}: " + "; ".join(problems))

    def _conflicts(self) -> list[str]:
        problems = []
        if self.role not in ROLES:
            return [f"role {self.role!r} is none of {list(ROLES)}"]
        if self.origin not in ORIGIN_KEYS:
            return [f"origin {self.origin!r} is none of {list(ORIGIN_KEYS)}"]
        if self.role not in ORIGIN_ROLES[self.origin]:
            problems.append(f"a {self.role} cannot have origin {self.origin!r}")
        if (self.role == "student") != (self.student_of is not None):
            problems.append(f"a {self.role} {'needs' if self.role == 'student' else 'has no'} {list(_STUDENT_KEYS)}")
        for key in sorted(_ORIGIN_ONLY):
            wanted = key in ORIGIN_KEYS[self.origin]
            if wanted != (getattr(self, key) is not None):
                problems.append(f"{key} is {'missing' if wanted else 'set'} for origin {self.origin!r}")
        for pair in _MEASURED:
            if len({getattr(self, k) is None for k in pair}) > 1:
                problems.append(f"{' and '.join(pair)} come together")
        s = self.student_of
        if s is not None and s.shares_teacher_vocab != (s.vocab_mismatch is None):
            problems.append("vocab_mismatch is set exactly when shares_teacher_vocab is false")
        if not isinstance(self.source.get("kind"), str):
            problems.append(f"source = {self.source!r} has no kind")
        return problems

    @property
    def weights(self) -> Weights:
        """Where the weights are (``load_path`` as this manifest holds it: resolved once read by read_manifest)."""
        return Weights(self.load_path, self.revision)

    def to_json(self) -> dict[str, Any]:
        """The file's object, keys in the order prepare has always built them (write_json sorts them anyway);
        the keys of another role or origin and the unmeasured ones left out."""
        out: dict[str, Any] = {"name": self.name, "role": self.role, "source": copy.deepcopy(self.source)}
        s = self.student_of
        if s is not None:
            out.update(teacher=s.teacher, teacher_manifest=s.teacher_manifest)
            out["teacher_heldout"] = _heldout(s.teacher_heldout)
        out.update({k: _write(getattr(self, k)) for k in ORIGIN_KEYS[self.origin]})
        if s is not None:
            out["shares_teacher_vocab"] = s.shares_teacher_vocab
            if s.vocab_mismatch is not None:
                out["vocab_mismatch"] = s.vocab_mismatch
        for pair in _MEASURED:
            out.update({k: getattr(self, k) for k in pair if getattr(self, k) is not None})
        out.update(heldout=_heldout(self.heldout), config_hash=self.config_hash, provenance=self.provenance)
        return out

    @classmethod
    def from_json(cls, data: Any, path: Any = None) -> ModelManifest:
        """A manifest from the file's parsed JSON; :class:`ManifestError` names the file (``path``) and every
        fault found: a missing or unknown key, a value of the wrong type, keys of another role or origin."""
        at = f"{path}: " if path is not None else ""
        try:
            if not isinstance(data, dict):
                raise ManifestError(f"expected a JSON object, found {type(data).__name__}")
            optional = [f.name for f in fields(cls) if f.name in _ORIGIN_ONLY or f.default is None]
            names = [f.name for f in fields(cls) if f.name != "student_of"]
            student = data.get("role") == "student"
            _check_keys(
                data,
                [*names, *_STUDENT_KEYS] if student else names,
                [n for n in names if n not in optional] + [k for k in _STUDENT_KEYS[:-1] if student],
                "",
            )
            values = {n: data.get(n) for n in names}
            values["heldout"] = HeldoutPerplexity.from_json(data["heldout"], "heldout")
            if isinstance(values["keep_layers"], list):
                values["keep_layers"] = tuple(values["keep_layers"])
            if student:
                s = {k: data.get(k) for k in _STUDENT_KEYS}
                s["teacher_heldout"] = HeldoutPerplexity.from_json(s["teacher_heldout"], "teacher_heldout")
                values["student_of"] = StudentOrigin(**s)
            return cls(**values)
        except ManifestError as e:
            raise ManifestError(f"{at}{e}") from None


def _check_keys(data: dict, known: list[str], required: list[str], where: str) -> None:
    at = f"{where}: " if where else ""
    unknown, missing = sorted(set(data) - set(known)), [k for k in required if k not in data]
    if unknown or missing:
        listed = [f"unknown keys {unknown}"] * bool(unknown) + [f"missing keys {missing}"] * bool(missing)
        raise ManifestError(at + "; ".join(listed))


def _heldout(h: HeldoutPerplexity | None) -> dict[str, Any] | None:
    return None if h is None else h.to_json()


def _write(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
