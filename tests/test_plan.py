"""The study plan: what each job reads and what the study produces, as rules/common.smk looks it up."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kdflow.config import ConfigError
from kdflow.plan import PlanError, StudyPlan, study_plan
from kdflow.runs import RunSpec, caches_read

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "config/config.yaml").read_text())


def default_plan(**edits) -> StudyPlan:
    config = copy.deepcopy(DEFAULT)
    config.update(edits)
    return study_plan(config, REPO)


@pytest.fixture(scope="module")
def plan() -> StudyPlan:
    return default_plan()


def test_each_mode_reads_only_the_caches_its_terms_need(plan):
    topk = "results/cache/smollm2-135m-instruct/topk_k16/index.json"
    embed = "results/cache/smollm2-135m-instruct/embed/index.json"
    hidden = "results/cache/smollm2-135m-instruct/hidden_l20/index.json"
    reads = {mode: plan.train_inputs(f"smollm2-pruned15.{mode}.s0") for mode in ("ce", "rb", "fb", "relb", "mix")}
    assert reads["ce"] == {
        "student": "resources/models/smollm2-pruned15/kdflow_model.json",
        "heldout": "results/shards/heldout.parquet",
        "topk": topk,
    }
    # rb reads the default's teacher_logits cache (12 systematic draws a position: docs/study_logits.md)
    tail = "results/cache/smollm2-135m-instruct/topk_k0_s12_sys/index.json"
    assert reads["rb"] == {**reads["ce"], "topk": tail}
    assert reads["fb"] == {**reads["ce"], "hidden": hidden}
    assert reads["relb"] == {**reads["ce"], "embed": embed}
    assert reads["mix"] == {**reads["ce"], "topk": tail, "embed": embed, "hidden": hidden}


def test_a_student_with_its_own_vocabulary_reads_the_embed_cache_for_its_text():
    assert caches_read({"ce": 1.0}, own_vocab=True) == {"embed": True, "hidden": False}
    assert caches_read({"ce": 1.0}, own_vocab=False) == {"embed": False, "hidden": False}


def test_expected_cache_metadata_names_the_layers_only_for_feature_kd(plan):
    assert plan.train_expected("smollm2-pruned15.ce.s0") == {
        "teacher": "smollm2-135m-instruct",
        "k": 16,
        "max_length": 128,
        "samples": None,  # a top-k cache: no sampled tail
    }
    assert plan.train_expected("smollm2-pruned15.fb.s0") == {
        "teacher": "smollm2-135m-instruct",
        "k": 16,
        "max_length": 128,
        "samples": None,
        "layers": [20],
        "token_ratio": 1.0,
    }


def test_every_run_and_baseline_is_evaluated(plan):
    targets = plan.eval_targets
    runs = [f"smollm2-pruned15.{m}.s0" for m in ("ce", "rb", "fb", "relb", "mix")]
    assert list(targets) == [*runs, "smollm2-135m-instruct", "smollm2-pruned15.init"]
    assert plan.eval_params("smollm2-pruned15.rb.s0") == {
        "kind": "run",
        "student": "smollm2-pruned15",
        "mode": "rb",
        "seed": 0,
        "tag": None,
        "manifest": "resources/models/smollm2-pruned15/kdflow_model.json",
        "adapter": "results/train/smollm2-pruned15.rb.s0",
        "gpus": 0,
        "model": "smollm2-pruned15.rb.s0",
    }
    assert "adapter" not in plan.eval_inputs("smollm2-135m-instruct")
    assert plan.eval_inputs("smollm2-pruned15.rb.s0")["adapter"] == "results/train/smollm2-pruned15.rb.s0"
    assert plan.expected_results()["models"] == sorted(targets)


def test_the_final_outputs_hold_every_shard_cache_run_and_evaluation(plan):
    out = plan.final_outputs()
    assert len(out) == len(set(out))
    assert sum(p.startswith("results/shards/") for p in out) == 5  # 4 shards + held-out
    assert sum(p.startswith("results/cache/") for p in out) == 15 + 4  # 3 caches x 5, and rb's own logit cache x 4
    assert sum(p.startswith("results/train/") for p in out) == 5
    assert sum(p.startswith("results/eval/") for p in out) == 14  # 7 models x 2
    assert out[-4:] == ["results/kdflow.duckdb", "results/summary.csv", "results/summary.md", "results/plots"]


def test_only_the_baselines_asked_for_are_evaluated():
    config = copy.deepcopy(DEFAULT)
    config["eval"] = {"baselines": ["teacher"]}
    assert list(study_plan(config, REPO).eval_targets)[-1] == "smollm2-135m-instruct"
    assert "smollm2-pruned15.init" not in study_plan(config, REPO).eval_targets


def test_a_relative_lm_eval_include_path_is_resolved_against_the_workflow(plan):
    include = plan.eval_settings()["lm_eval"]["include_path"]
    assert Path(include).is_absolute() and Path(include).is_relative_to(REPO)
    assert plan.config["eval"]["lm_eval"]["include_path"] == "resources/lm_eval_tasks"  # the config is untouched


def test_the_train_job_gets_its_run_spec_as_a_plain_dict(plan):
    """rules/train.smk's ``spec`` parameter: a dict (Snakemake's params trigger compares its repr), a fresh one on
    every call, which the trainer reads back as the plan's RunSpec."""
    run = "smollm2-pruned15.mix.s0"
    spec = plan.run_spec(run)
    assert type(spec) is dict and RunSpec.from_json(spec) == plan.run(run) == plan.runs[run]
    assert spec["fb"]["layer_map"] == [{"student": 5, "teacher": 20}] and spec["terms"]["relb"] == 0.5
    spec["steps"] = 1
    assert plan.run_spec(run)["steps"] == 8 and repr(plan.run_spec(run)) == repr(plan.run_spec(run))
    assert plan.train_gpus(run) == 0 and plan.train_tasks(run) is None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p.run_spec("nope.ce.s0"), "run 'nope.ce.s0' is not in the config's training.experiments"),
        (lambda p: p.run("nope.ce.s0"), "run 'nope.ce.s0' is not in the config's training.experiments"),
        (lambda p: p.eval_target("nope"), "'nope' is neither a training run nor a baseline"),
        (lambda p: p.model_config("nope"), "model 'nope' is not in the config"),
        (lambda p: p.cache_index_inputs("topk_k8"), "topk_k8: not a cache of this config"),
    ],
)
def test_a_target_outside_the_study_is_refused_naming_what_exists(plan, call, message):
    with pytest.raises(PlanError, match=message):
        call(plan)


def test_the_plan_validates_its_config_first():
    with pytest.raises(ConfigError, match="unknown key teacher_cache.kk"):
        default_plan(teacher_cache={**DEFAULT["teacher_cache"], "kk": 1})


def test_a_cache_jobs_finished_parts_live_outside_its_outputs(plan):
    assert plan.partial_dir("topk_k16", "{shard}") == "results/cache/.partial/smollm2-135m-instruct/topk_k16/{shard}"
