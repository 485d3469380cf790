"""Stage `register`: log the ONNX model to the MLflow registry and settle `@champion`.

The promotion gate: a version passes when its ONNX parity check passed, its test accuracy
is at least `register.min_accuracy`, and that accuracy is better than answering the test set's
most common class for every image, by a one-sided binomial test at `register.significance`
(a trained model fails it on a small test set: 9 right of 18 in three balanced classes does).
`@champion` names the most accurate version that passed (the newest among equals), so a new
version takes it only when it is at least as accurate as the champion; every other new version
becomes `@challenger`. The decision and its reason go to `reports/<dataset>/register.json`,
onto the model version (tags, description) and the run.

Accuracies compare on one test. Each version records how its accuracy was measured: the
prepared data (DATA_TAG) and evaluate's crops (CROPS_TAG). When either has changed since
(images added to or removed from a folder dataset, `prepare.max_test`, `evaluate.ten_crop`),
every version that passed the gate is re-tested as today's model was, its own ONNX model
through onnxruntime, before the champion is chosen. A version whose classes or channels are
not today's cannot be re-tested and leaves the running: it cannot answer what the test asks.
A version remembers each test it has had (TESTS_TAG), so a test it already had (the data or
the crops changed back) is answered from memory, without loading its model again.

Parallel registers (`dvc queue start -j N`, parallel flow runs) are safe: in one workspace
they take turns under a file lock, and across machines the champion is re-derived from the
registry after the alias is set until what was set is what the registry says is best. A model
whose weights equal a version already registered is not registered again: the run names that
version.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from alexops import files, tracking
from alexops.errors import AlexopsError
from alexops.params import Params
from alexops.paths import Paths

CHAMPION = "champion"
CHALLENGER = "challenger"
DIGEST_TAG = "model.sha256"
GATE_TAG = "gate"  # "passed" | "failed"
DATA_TAG = "data.prepared"  # dvc.lock's hash of the prepared data: the test set the accuracy is on
CROPS_TAG = "test.crops"  # "10-crop" | "centre": how evaluate scored the accuracy
RETEST_TAG = "retested"  # what re-testing on today's test found: accuracy before and after
TESTS_TAG = "tests"  # JSON {"<data> <crops>": accuracy or null}: every test the version has had
TESTS_KEPT = 32  # the newest tests a version remembers (a tag value holds at most 5,000 characters)
RETEST_BATCH = 64  # test images per onnxruntime call (× 10 views with 10-crop)
SETTLE_ROUNDS = 5  # set-then-verify rounds; each concurrent register can move the alias at most once


def model_name(params: Params) -> str:
    """The registered model of the params' dataset, e.g. `alexnet-fashion-mnist`."""
    return f"{params.register.model_prefix}-{params.base.dataset}"


def parity_passed(export: dict) -> tuple[bool, float]:
    """(passed?, worst |onnxruntime − PyTorch|) from export's report."""
    worst = max((v for k, v in export.items() if k.startswith("parity_max")), default=float("nan"))
    tolerance = float(export.get("parity_tolerance", 0.0))
    return bool(export.get("parity_passed")) and worst <= tolerance, worst


@dataclass(frozen=True)
class Chance:
    """What the test set lets a model score without learning anything (evaluate.json), and the
    significance level its accuracy must beat that at."""

    test_images: int
    majority_class: str
    majority_class_accuracy: float
    significance: float

    @classmethod
    def of(cls, evaluation: dict, significance: float) -> Chance:
        """From evaluate.json (`test_images`, `majority_class`, `majority_class_accuracy`)."""
        try:
            return cls(
                int(evaluation["test_images"]),
                str(evaluation["majority_class"]),
                float(evaluation["majority_class_accuracy"]),
                significance,
            )
        except KeyError as missing:
            raise AlexopsError(
                f"evaluate.json has no {missing} (written by an older evaluate). Fix: `dvc repro evaluate`"
            ) from None

    def p_value(self, accuracy: float) -> float:
        """P(≥ this many right of `test_images`) for a model right with probability
        `majority_class_accuracy` per image: one-sided exact binomial test (scipy.stats.binomtest)."""
        from scipy.stats import binomtest

        correct = round(accuracy * self.test_images)
        return binomtest(
            correct, self.test_images, self.majority_class_accuracy, alternative="greater"
        ).pvalue


def decide(
    accuracy: float,
    parity: tuple[bool, float],
    min_accuracy: float,
    champion_accuracy: float | None,
    chance: Chance | None = None,
) -> tuple[bool, str]:
    """The promotion gate against a champion: (promote?, reason), every check named in the reason."""
    passed, worst = parity
    if not passed:
        return False, f"ONNX parity check failed (max |diff| {worst:.1e})"
    if accuracy < min_accuracy:
        return False, f"accuracy {accuracy:.4f} < register.min_accuracy {min_accuracy:.4f}"
    beats = ""
    if chance is not None:
        p = chance.p_value(accuracy)
        if p > chance.significance:
            return False, not_better_than_chance(accuracy, chance, p)
        beats = f", {better_than_chance(chance, p)}"
    if champion_accuracy is None:
        return True, f"no champion yet; parity ok, accuracy {accuracy:.4f} ≥ min {min_accuracy:.4f}{beats}"
    if accuracy < champion_accuracy:
        return False, f"accuracy {accuracy:.4f} < champion's {champion_accuracy:.4f}"
    return True, f"parity ok; accuracy {accuracy:.4f} ≥ champion's {champion_accuracy:.4f} and ≥ min{beats}"


def better_than_chance(chance: Chance, p: float) -> str:
    shown = f"p = {p:.2g}" if p >= 1e-4 else "p < 0.0001"  # 92% of 10,000 against 10%: p is 0.0 in float
    return f"better than answering {chance.majority_class!r} every time ({shown})"


def not_better_than_chance(accuracy: float, chance: Chance, p: float) -> str:
    said = (
        f"accuracy {accuracy:.4f} on {chance.test_images} test images is not better than answering "
        f"{chance.majority_class!r} for every image ({chance.majority_class_accuracy:.4f}): binomial "
        f"p = {p:.3g} > register.significance {chance.significance:g}"
    )
    if chance.majority_class_accuracy >= 1.0:
        return f"{said}; the test set holds one class only. Fix: test images of every class"
    return f"{said}. Fix: more test images, train longer, or register.significance: 1.0 (no check)"


def weights_digest(proto: onnx.ModelProto) -> str:
    """SHA-256 over the model's weights (initializer names, dtypes, shapes and values): two
    trainings that end in the same weights give the same digest, whatever the file's layout."""
    digest = hashlib.sha256()
    for initializer in sorted(proto.graph.initializer, key=lambda i: i.name):
        array = numpy_helper.to_array(initializer)
        digest.update(f"{initializer.name}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def run(params: Params, paths: Paths) -> None:
    evaluation = files.read_json(paths.reports / "evaluate.json", produced_by="evaluate")
    export = files.read_json(paths.reports / "export.json", produced_by="export")
    if not paths.onnx.exists():
        raise AlexopsError(f"{paths.onnx} is missing. Fix: run `dvc repro export` first.")
    proto = onnx.load(str(paths.onnx))
    name = model_name(params)
    with tracking.continue_run(params, paths, "register") as mlflow, tracking.registry_lock(paths.root, name):
        from mlflow import MlflowClient

        with tracking.store_write(mlflow):
            mlflow.set_tags(tracking.dvc_lock_tags(paths.root))
        record = decide_version(mlflow, MlflowClient(), params, paths, proto, evaluation, export)
        with tracking.store_write(mlflow):
            mlflow.set_tags(
                {
                    "registered_model": name,
                    "registered_version": record["version"],
                    "alias": record["alias"] or "none",
                    "decision": record["reason"],
                }
            )
    record |= {
        "run_id": tracking.model_run_id(paths),
        "min_accuracy": params.register.min_accuracy,
        "significance": params.register.significance,
    }
    files.write_json(paths.reports / "register.json", record)
    alias = f"@{record['alias']}" if record["alias"] else "no alias"
    print(f"register: {name} version {record['version']} → {alias} ({record['reason']})")


def decide_version(
    mlflow, client, params: Params, paths: Paths, proto, evaluation: dict, export: dict
) -> dict:
    """Register the model, or find the version with its weights; pass it through the gate with
    today's evaluation and params; settle @champion. The record register.json holds."""
    name = model_name(params)
    accuracy = float(evaluation["accuracy"])
    digest = weights_digest(proto)
    chance = Chance.of(evaluation, params.register.significance)
    passed, reason = decide(accuracy, parity_passed(export), params.register.min_accuracy, None, chance)
    tags = {"accuracy": f"{accuracy:.6f}", DIGEST_TAG: digest, GATE_TAG: "passed" if passed else "failed"}
    test = test_of(params, paths)
    tags |= test
    retested = retest_as_today(client, name, test, digest, paths)
    before = champion_of(client, name)
    same = identical_version(client, name, digest)
    tests = tests_so_far(same, test) if same is not None else {}
    remember(tests, which_test(test, test), _json_number(accuracy))
    tags[TESTS_TAG] = kept(tests)
    # the registry's writes, quick ones: a stop waits for them on SQLite (tracking.store_write)
    with tracking.store_write(mlflow):
        if same is None:
            version = register_version(mlflow, proto, name, tags)
        else:  # the same weights: decided again, with what evaluate, export and register say now
            version = str(same.version)
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, value)
        champion = settle_champion(client, name)
        alias = CHAMPION if champion is not None and str(champion.version) == version else CHALLENGER
        if passed:
            reason = promotion_reason(accuracy, params.register.min_accuracy, chance, before, champion, alias)
        if retested:
            reason += "; re-tested as this version was: " + ", ".join(r["said"] for r in retested)
        if alias == CHALLENGER:
            client.set_registered_model_alias(name, CHALLENGER, version)
        elif retested:
            drop_challenger_out_of_the_running(client, name)
        client.set_model_version_tag(name, version, "decision", f"{alias}: {reason}")
        int8_uri = attach_int8(mlflow, client, paths, name, version)
        client.update_model_version(
            name, version, description=describe(params, evaluation, export, alias, reason)
        )
    if same is not None:
        reason = f"identical weights to version {version} ({DIGEST_TAG} {digest[:12]}…): {reason}"
    return {
        "model_name": name,
        "version": version,
        "alias": alias,
        "registered": same is None,
        "reason": reason,
        "accuracy": accuracy,
        "chance_p_value": chance.p_value(accuracy),
        "previous_champion": None if before is None else str(before.version),
        "retested": retested,
        "model_uri": f"models:/{name}/{version}",
        "int8_uri": int8_uri,
    }


def register_version(mlflow, proto: onnx.ModelProto, name: str, tags: dict[str, str]) -> str:
    """Log the ONNX model to the active run and register it as a new version, its gate's tags
    written with the version (a version never exists without them)."""
    # The MLmodel lists CUDA before the CPU, so `mlflow models serve` uses a GPU where it has one;
    # that this host has none, as MLflow says when it checks the input example, is not news here.
    onnx_logger = logging.getLogger("mlflow.onnx")
    onnx_logger.addFilter(_no_missing_provider_warning)
    try:
        info = mlflow.onnx.log_model(
            proto,
            name="model",
            input_example=example_input(proto),
            signature=signature(proto),
            metadata={"accuracy": tags["accuracy"]},
            # the flavor's own pins; inferring them imports the model in a subprocess: 6-13 s
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
        )
    finally:
        onnx_logger.removeFilter(_no_missing_provider_warning)
    return str(mlflow.register_model(info.model_uri, name, tags=tags).version)


def _no_missing_provider_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("ONNX model declares execution providers")


def identical_version(client, name: str, digest: str):
    """The registered version whose weights have this digest, if any."""
    if not client.search_registered_models(f"name = '{name}'"):
        return None
    found = client.search_model_versions(f"name = '{name}' and tags.`{DIGEST_TAG}` = '{digest}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def promotion_reason(
    accuracy: float, min_accuracy: float, chance: Chance, before, champion, alias: str
) -> str:
    """Why a version that passed the gate holds its alias."""
    if alias == CHAMPION and before is not None and str(before.version) == str(champion.version):
        beats = better_than_chance(chance, chance.p_value(accuracy))
        floor = f"accuracy {accuracy:.4f} ≥ min {min_accuracy:.4f}"
        return f"parity ok; {floor}, {beats}; still the best that passed"
    if alias == CHALLENGER:  # passed the gate, but a better version holds @champion
        best = f"{accuracy_of(champion):.4f} (version {champion.version})"
        return f"accuracy {accuracy:.4f} < champion's {best}"
    if before is not None and np.isnan(accuracy_of(before)):  # re-tested: it cannot answer today's test
        reason = decide(accuracy, (True, 0.0), min_accuracy, None, chance)[1]
        out = f"the champion before, version {before.version}, is out of the running"
        return f"{out}; {reason.removeprefix('no champion yet; ')}"
    rival = None if before is None else accuracy_of(before)
    return decide(accuracy, (True, 0.0), min_accuracy, rival, chance)[1]


def test_of(params: Params, paths: Paths) -> dict[str, str]:
    """How today's accuracy is measured, as version tags: evaluate's crops, and the prepared
    data when DVC ran prepare (its hash in dvc.lock)."""
    test = {CROPS_TAG: "10-crop" if params.evaluate.ten_crop else "centre"}
    data = tracking.data_hash(paths)
    return test | ({DATA_TAG: data} if data else {})


def tested_otherwise(version, test: dict[str, str]) -> bool:
    """Whether `version` recorded a test (data, crops) other than `test`; one it did not record
    counts as the same."""
    return any(version.tags.get(key) not in (None, value) for key, value in test.items())


def retest_as_today(client, name: str, test: dict[str, str], digest: str, paths: Paths) -> list[dict]:
    """Re-test as `test` says (today's test set and crops) every version that passed the gate on
    another test, other than the one with these weights (`digest`, tested by evaluate), and
    re-tag it: its `accuracy` and test today's, or NaN (out of the running) when its classes or
    channels are not today's. Returns what was found, one dict per version, for register.json."""
    stale = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if passed_gate(v) and tested_otherwise(v, test) and v.tags.get(DIGEST_TAG) != digest
    ]
    if not stale:
        return []
    from alexops.prepare import load_split
    from alexops.serving.model import ModelSource, parse_model_uri

    test_set = functools.cache(lambda: load_split(paths.prepared / "test.pt"))  # not read if all remembered
    classes = tuple(files.read_json(paths.prepared / "stats.json", produced_by="prepare")["classes"])
    found = []
    for version in sorted(stale, key=lambda v: int(v.version)):
        before, tests, today = accuracy_of(version), tests_so_far(version, test), which_test(test, test)
        known, remembered = recall(tests, test)
        if known:
            after = float("nan") if remembered is None else remembered
            said = (
                f"version {version.version} {before:.4f} → {after:.4f}, as on this test before"
                if remembered is not None
                else f"version {version.version} cannot be, as on this test before"
            )
        else:
            uri = f"models:/{name}/{version.version}"
            model = ModelSource(parse_model_uri(uri), tracking.tracking_uri(paths.root)).load()
            images, labels = test_set()
            if model.classes != classes or model.input.channels != images.shape[1]:
                after = float("nan")
                said = f"version {version.version} cannot be (its classes or channels are not today's)"
            else:
                after = onnx_accuracy(model, images, labels, ten_crop=test[CROPS_TAG] == "10-crop")
                said = f"version {version.version} {before:.4f} → {after:.4f}"
        remember(tests, today, _json_number(after))
        was = ", ".join(f"{key} {version.tags[key]}" for key in test if key in version.tags)
        tags = test | {"accuracy": f"{after:.6f}", RETEST_TAG: f"{said} (was {was})", TESTS_TAG: kept(tests)}
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, value)
        numbers = {"before": _json_number(before), "after": _json_number(after)}
        found.append({"version": str(version.version), **numbers, "said": said})
    return found


def which_test(tags: dict[str, str], test: dict[str, str]) -> str:
    """The test that `tags` record, as "<data> <crops>" for the keys that `test` names (a key
    they lack: "-")."""
    return " ".join(tags.get(key, "-") for key in sorted(test))


def tests_of(version) -> dict[str, float | None]:
    """The tests a version has had (TESTS_TAG), oldest first; {} when it has none or the tag is
    not what register writes."""
    try:
        tests = json.loads(version.tags.get(TESTS_TAG, "{}"))
    except ValueError:
        return {}
    if not isinstance(tests, dict):
        return {}
    return {key: value for key, value in tests.items() if value is None or _finite_number(value)}


def _finite_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # not bool, NaN or Infinity


def recall(tests: dict[str, float | None], test: dict[str, str]) -> tuple[bool, float | None]:
    """Whether `tests` hold `test`, and its accuracy there (None: could not answer). A test
    without the prepared data's hash (register run outside DVC) is never known again: its
    crops alone do not say which images it was."""
    key = which_test(test, test)
    return (DATA_TAG in test and key in tests), tests.get(key)


def tests_so_far(version, test: dict[str, str]) -> dict[str, float | None]:
    """The tests `version` has had, the one its tags record now the newest (its score from
    memory, at full precision, where the tests tag has it; else its 6-decimal accuracy tag)."""
    tests, had = tests_of(version), which_test(version.tags, test)
    remember(tests, had, tests[had] if had in tests else _json_number(accuracy_of(version)))
    return tests


def remember(tests: dict[str, float | None], key: str, accuracy: float | None) -> None:
    """Record `accuracy` (None: out of the running) for the test `key`, as the newest."""
    tests.pop(key, None)
    tests[key] = accuracy


def kept(tests: dict[str, float | None]) -> str:
    """The newest TESTS_KEPT tests as JSON (dicts keep insertion order: the oldest go first)."""
    newest = list(tests.items())[-TESTS_KEPT:]
    return json.dumps(dict(newest), separators=(",", ":"))


def _json_number(value: float) -> float | None:
    """NaN as JSON's null: `NaN` is no JSON, and other readers than Python's refuse it."""
    return None if np.isnan(value) else value


def drop_challenger_out_of_the_running(client, name: str) -> None:
    """Remove @challenger when the version it names can no longer answer today's test (its
    accuracy NaN after a re-test): it challenges nothing."""
    aliases = client.get_registered_model(name).aliases
    if CHALLENGER in aliases and np.isnan(accuracy_of(client.get_model_version(name, aliases[CHALLENGER]))):
        client.delete_registered_model_alias(name, CHALLENGER)


def onnx_accuracy(model, images, labels, ten_crop: bool) -> float:
    """Test accuracy of a loaded ONNX model (alexops.serving.model.LoadedModel) on uint8 (N, C, H, W)
    images, scored by evaluate's own prediction code: the centre crop, or the mean softmax of the
    10 crops."""
    from alexops.evaluate import predict_probabilities

    probabilities = predict_probabilities(
        _OnnxModule(model), images, model.recipe, RETEST_BATCH, "cpu", ten_crop
    )
    return int((probabilities.argmax(1) == labels).sum()) / len(labels)


class _OnnxModule(torch.nn.Module):
    """An onnxruntime session as a module: (N, C, S, S) float32 → (N, classes) logits."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session, name = self.model.session, self.model.input.name
        return torch.from_numpy(session.run([self.model.output_name], {name: x.numpy()})[0])


def accuracy_of(version) -> float:
    return float(version.tags.get("accuracy", "nan"))


def passed_gate(version) -> bool:
    """Whether a version passed the gate (older versions record it in their decision tag)."""
    gate = version.tags.get(GATE_TAG)
    if gate is not None:
        return gate == "passed"
    return version.tags.get("decision", "").startswith(f"{CHAMPION}:")


def best_version(client, name: str):
    """The most accurate version that passed the gate (the newest among equals), or None."""
    passed = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if passed_gate(v) and not np.isnan(accuracy_of(v))
    ]
    return max(passed, key=lambda v: (accuracy_of(v), int(v.version)), default=None)


def champion_of(client, name: str):
    """The version @champion names, or None (no such alias, or no such model yet)."""
    from mlflow.exceptions import MlflowException

    try:  # the aliases, rather than a lookup by alias, whose error could also be the network
        aliases = client.get_registered_model(name).aliases
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return client.get_model_version(name, aliases[CHAMPION]) if CHAMPION in aliases else None


def settle_champion(client, name: str):
    """Point @champion at the best version, then re-read until the registry agrees: a register
    on another machine that set the alias meanwhile is corrected here, or corrects us."""
    best = None
    for _ in range(SETTLE_ROUNDS):
        best = best_version(client, name)
        if best is None:  # none passes (the champion itself failed since, or was retired): no alias
            if champion_of(client, name) is not None:
                client.delete_registered_model_alias(name, CHAMPION)
            return None
        current = champion_of(client, name)
        if current is not None and str(current.version) == str(best.version):
            return best
        set_champion(client, name, best.version, was_set=current is not None)
    return best


def set_champion(client, name: str, version: str, was_set: bool) -> None:
    """@champion → version. Two registers that both find no alias both insert one, and the SQL
    store's unique key refuses the second: that one lost a race, not failed; the next round of
    `settle_champion` re-reads the alias and corrects it if need be."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(name, CHAMPION, version)
    except MlflowException:
        if was_set or champion_of(client, name) is None:
            raise


def attach_int8(mlflow, client, paths: Paths, name: str, version: str) -> str | None:
    """The quantize stage's int8 model, as an artifact of the run and tags on the version (unless
    the version already carries this very file)."""
    if not paths.int8_onnx.exists():
        return None
    digest = files.sha256_file(paths.int8_onnx)
    current = client.get_model_version(name, version).tags
    if current.get("int8.sha256") == digest:
        return current.get("int8.uri")
    report = files.read_json(paths.reports / "quantize.json", produced_by="quantize")
    mlflow.log_artifact(str(paths.int8_onnx), artifact_path="int8")
    uri = f"runs:/{mlflow.active_run().info.run_id}/int8/{paths.int8_onnx.name}"
    tags = {"int8.uri": uri, "int8.sha256": digest}
    tags |= {f"int8.{k}": str(v) for k, v in report.items() if not isinstance(v, dict)}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return uri


def describe(params: Params, evaluation: dict, export: dict, alias: str, reason: str) -> str:
    """The model version's description: what it is, its metrics, and why it got its alias."""
    crops = "10-crop" if evaluation.get("ten_crop") else "centre crop"
    lines = [
        f"AlexNet on {params.base.dataset}, {params.train.image_size} px, width {params.train.width:g}, "
        f"{params.train.epochs} epochs.",
        f"Test accuracy {evaluation['accuracy']:.4f} ({crops}); centre crop "
        f"{evaluation['accuracy_center_crop']:.4f}; test loss {evaluation['loss_center_crop']:.4f} (centre).",
        f"ONNX parity max |diff| {parity_passed(export)[1]:.1e}.",
        f"@{alias}: {reason}.",
    ]
    return "\n".join(lines)


def signature(proto: onnx.ModelProto):
    """The model's signature from its graph: float32 (-1, C, S, S) in, (-1, classes) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(value_info) -> TensorSpec:
        dims = [d.dim_value or -1 for d in value_info.type.tensor_type.shape.dim]
        return TensorSpec(np.dtype(np.float32), tuple(dims), value_info.name)

    return ModelSignature(Schema([spec(proto.graph.input[0])]), Schema([spec(proto.graph.output[0])]))


def example_input(proto: onnx.ModelProto) -> np.ndarray:
    """One zero image of the model's input shape (batch of 1)."""
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return np.zeros([1, *dims[1:]], dtype=np.float32)
