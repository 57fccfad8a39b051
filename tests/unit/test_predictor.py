"""Loading a user's predictor and calling it with the arguments it declares (spec §3)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from cortex.predictor import CLASS_NAME, Predictor, PredictorError, load_class

JOB_SPEC = {"job_id": "69d9c0013c2d0d97", "api_name": "demo", "workers": 1}


def module(tmp_path: Path, body: str, name: str = "predictor.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def load(tmp_path: Path, body: str) -> type:
    return load_class(module(tmp_path, body))


def build(tmp_path: Path, body: str, config: dict[str, Any] | None = None) -> Predictor:
    return Predictor(load(tmp_path, body), config or {}, JOB_SPEC)


class TestArguments:
    def test_payload_only(self, tmp_path: Path) -> None:
        p = build(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    self.seen = []
                def predict(self, payload):
                    self.seen.append(payload)
                    return len(payload)
            """,
        )
        assert p.predict([1, 2, 3], "batch-1") == 3
        assert p.instance.seen == [[1, 2, 3]]

    def test_batch_id_then_payload_passed_by_name(self, tmp_path: Path) -> None:
        p = build(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    pass
                def predict(self, batch_id, payload):
                    return (batch_id, payload)
            """,
        )
        assert p.predict(["a"], "b-42") == ("b-42", ["a"])

    def test_batch_id_only(self, tmp_path: Path) -> None:
        p = build(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    pass
                def predict(self, batch_id):
                    return batch_id
            """,
        )
        assert p.predict(["ignored"], "only-id") == "only-id"

    def test_no_arguments(self, tmp_path: Path) -> None:
        p = build(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    self.calls = 0
                def predict(self):
                    self.calls += 1
            """,
        )
        p.predict([1], "x")
        p.predict([2], "y")
        assert p.instance.calls == 2

    def test_headers_and_query_params_are_none(self, tmp_path: Path) -> None:
        p = build(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    pass
                def predict(self, query_params, payload, headers, batch_id):
                    return (payload, batch_id, headers, query_params)
            """,
        )
        assert p.predict({"k": 1}, "id") == ({"k": 1}, "id", None, None)

    def test_keyword_only_arguments(self, tmp_path: Path) -> None:
        p = build(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, *, config):
                    self.config = config
                def predict(self, *, payload):
                    return payload
            """,
            config={"a": 1},
        )
        assert p.instance.config == {"a": 1}
        assert p.predict([7], "id") == [7]

    def test_init_config_only(self, tmp_path: Path) -> None:
        p = build(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    self.config = config
                def predict(self, payload):
                    return self.config["scale"] * payload[0]
            """,
            config={"scale": 3},
        )
        assert p.instance.config == {"scale": 3}
        assert p.predict([2], "id") == 6

    def test_init_config_and_job_spec(self, tmp_path: Path) -> None:
        p = build(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, job_spec, config):
                    self.job_spec = job_spec
                    self.config = config
                def predict(self, payload):
                    pass
            """,
            config={"dest": "out"},
        )
        assert p.instance.config == {"dest": "out"}
        assert p.instance.job_spec == JOB_SPEC

    def test_job_spec_is_a_copy(self, tmp_path: Path) -> None:
        spec = dict(JOB_SPEC)
        cls = load(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config, job_spec):
                    job_spec["job_id"] = "changed"
                    self.job_spec = job_spec
                def predict(self):
                    pass
            """,
        )
        p = Predictor(cls, {}, spec)
        assert p.instance.job_spec["job_id"] == "changed"
        assert spec == JOB_SPEC

    def test_python_client_is_none(self, tmp_path: Path) -> None:
        p = build(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config, python_client):
                    self.client = python_client
                def predict(self):
                    pass
            """,
        )
        assert p.instance.client is None

    def test_exception_from_predict_propagates(self, tmp_path: Path) -> None:
        p = build(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    pass
                def predict(self, payload):
                    raise KeyError(payload[0])
            """,
        )
        with pytest.raises(KeyError, match="boom"):
            p.predict(["boom"], "id")

    def test_exception_from_init_propagates(self, tmp_path: Path) -> None:
        cls = load(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    raise ValueError("missing " + config["need"])
                def predict(self):
                    pass
            """,
        )
        with pytest.raises(ValueError, match="missing dest_s3_dir"):
            Predictor(cls, {"need": "dest_s3_dir"}, JOB_SPEC)


def refused(tmp_path: Path, body: str) -> str:
    with pytest.raises(PredictorError) as info:
        load(tmp_path, body)
    return str(info.value)


class TestSignatureChecks:
    def test_unknown_predict_argument(self, tmp_path: Path) -> None:
        message = refused(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    pass
                def predict(self, payload, sample):
                    pass
            """,
        )
        assert "PythonPredictor.predict" in message
        assert "'sample'" in message

    def test_unknown_init_argument(self, tmp_path: Path) -> None:
        message = refused(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config, tensorflow_client):
                    pass
                def predict(self, payload):
                    pass
            """,
        )
        assert "PythonPredictor.__init__" in message
        assert "'tensorflow_client'" in message

    def test_init_without_config(self, tmp_path: Path) -> None:
        message = refused(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, job_spec):
                    pass
                def predict(self, payload):
                    pass
            """,
        )
        assert "missing required argument 'config'" in message

    def test_init_not_defined(self, tmp_path: Path) -> None:
        refused(
            tmp_path,
            """
            class PythonPredictor:
                def predict(self, payload):
                    pass
            """,
        )

    def test_predict_missing(self, tmp_path: Path) -> None:
        message = refused(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    pass
            """,
        )
        assert "predict" in message

    @pytest.mark.parametrize(
        "signature",
        ["payload, self", "this, payload", "payload", ""],
    )
    def test_self_must_come_first(self, tmp_path: Path, signature: str) -> None:
        message = refused(
            tmp_path,
            f"""
            class PythonPredictor:
                def __init__(self, config):
                    pass
                def predict({signature}):
                    pass
            """,
        )
        assert "first argument must be self" in message

    def test_self_must_come_first_in_init(self, tmp_path: Path) -> None:
        message = refused(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(config, self):
                    pass
                def predict(self):
                    pass
            """,
        )
        assert "PythonPredictor.__init__: the first argument must be self" in message

    def test_static_predict_refused(self, tmp_path: Path) -> None:
        message = refused(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    pass
                @staticmethod
                def predict(payload):
                    pass
            """,
        )
        assert "first argument must be self" in message

    @pytest.mark.parametrize(
        "signature", ["self, *args", "self, **kwargs", "self, payload, **kwargs"]
    )
    def test_var_arguments_refused(self, tmp_path: Path, signature: str) -> None:
        refused(
            tmp_path,
            f"""
            class PythonPredictor:
                def __init__(self, config):
                    pass
                def predict({signature}):
                    pass
            """,
        )

    @pytest.mark.parametrize("signature", ["self, payload, /", "self, *payload", "self, **payload"])
    def test_arguments_that_cannot_be_passed_by_name_refused(
        self, tmp_path: Path, signature: str
    ) -> None:
        message = refused(
            tmp_path,
            f"""
            class PythonPredictor:
                def __init__(self, config):
                    pass
                def predict({signature}):
                    pass
            """,
        )
        assert "'payload'" in message

    def test_on_job_complete_takes_only_self_and_job_summary(self, tmp_path: Path) -> None:
        message = refused(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    pass
                def predict(self):
                    pass
                def on_job_complete(self, payload):
                    pass
            """,
        )
        assert "PythonPredictor.on_job_complete" in message
        assert "allowed: job_summary" in message

    def test_on_job_complete_gets_the_summary_only_if_it_declares_it(self) -> None:
        seen: list[Any] = []

        class WithSummary:
            def __init__(self, config: Any) -> None:
                pass

            def predict(self, payload: Any) -> None:
                pass

            def on_job_complete(self, job_summary: Any) -> None:
                seen.append(job_summary)

        class Without(WithSummary):
            def on_job_complete(self) -> None:  # type: ignore[override]
                seen.append("no summary")

        summary = {"succeeded": 2, "failed": 1, "total": 3, "any_failed": True}
        Predictor(WithSummary, {}, {}).on_job_complete(summary)
        Predictor(Without, {}, {}).on_job_complete(summary)
        assert seen == [summary, "no summary"]

    def test_signature_also_checked_when_building(self, tmp_path: Path) -> None:
        class PythonPredictor:
            def __init__(self, config: Any, extra: Any) -> None:
                pass

            def predict(self) -> None:
                pass

        with pytest.raises(PredictorError, match="'extra'"):
            Predictor(PythonPredictor, {}, JOB_SPEC)


class TestModule:
    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(PredictorError, match="does not exist"):
            load_class(tmp_path / "nope.py")

    def test_folder_is_not_a_file(self, tmp_path: Path) -> None:
        (tmp_path / "pkg.py").mkdir()
        with pytest.raises(PredictorError, match="does not exist"):
            load_class(tmp_path / "pkg.py")

    def test_missing_class(self, tmp_path: Path) -> None:
        message = refused(
            tmp_path,
            """
            class Predictor:
                def __init__(self, config):
                    pass
                def predict(self):
                    pass
            """,
        )
        assert f"must define a class named {CLASS_NAME}" in message

    def test_name_bound_to_non_class(self, tmp_path: Path) -> None:
        message = refused(
            tmp_path,
            """
            def PythonPredictor(config):
                return None
            """,
        )
        assert f"must define a class named {CLASS_NAME}" in message

    def test_returns_the_class(self, tmp_path: Path) -> None:
        cls = load(
            tmp_path,
            """
            MARK = "loaded"
            class PythonPredictor:
                def __init__(self, config):
                    pass
                def predict(self):
                    return MARK
            """,
        )
        assert cls.__name__ == CLASS_NAME
        assert Predictor(cls, {}, JOB_SPEC).predict([], "id") == "loaded"

    def test_second_load_gets_the_new_module(self, tmp_path: Path) -> None:
        body = """
            class PythonPredictor:
                def __init__(self, config):
                    pass
                def predict(self):
                    return {value!r}
            """
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        one = load_class(module(tmp_path / "a", body.format(value="one")))
        two = load_class(module(tmp_path / "b", body.format(value="two")))
        assert Predictor(one, {}, JOB_SPEC).predict([], "i") == "one"
        assert Predictor(two, {}, JOB_SPEC).predict([], "i") == "two"

    def test_inherited_methods_checked(self, tmp_path: Path) -> None:
        cls = load(
            tmp_path,
            """
            class Base:
                def __init__(self, config):
                    self.config = config
                def predict(self, payload):
                    return sum(payload)
            class PythonPredictor(Base):
                pass
            """,
        )
        assert Predictor(cls, {}, JOB_SPEC).predict([1, 2], "id") == 3


class TestHook:
    def test_has_hook_true_and_called(self, tmp_path: Path) -> None:
        p = build(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    self.completed = 0
                def predict(self):
                    pass
                def on_job_complete(self):
                    self.completed += 1
            """,
        )
        assert p.has_hook is True
        p.on_job_complete()
        assert p.instance.completed == 1

    def test_has_hook_false(self, tmp_path: Path) -> None:
        p = build(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    pass
                def predict(self):
                    pass
            """,
        )
        assert p.has_hook is False

    def test_non_callable_hook_attribute(self, tmp_path: Path) -> None:
        p = build(
            tmp_path,
            """
            class PythonPredictor:
                def __init__(self, config):
                    self.on_job_complete = None
                def predict(self):
                    pass
            """,
        )
        assert p.has_hook is False
