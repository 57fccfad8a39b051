"""cortex.yaml parsing, job submissions, batching, config merging and quantities (spec §2-§4.1)."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest

from cortex import errors, spec
from cortex.jobspec import item_batches, parse_submission
from cortex.spec import (
    MAX_ITEM_BYTES,
    MAX_NAME_LENGTH,
    RESERVED_NAMES,
    deep_merge,
    load_config_file,
    parse_quantity,
)

MINIMAL = """\
- name: image-classifier
  kind: BatchAPI
  predictor: {type: python, path: predictor.py}
  compute: {cpu: 1}
"""


def api_yaml(
    name: str = "my-api",
    predictor: str = "{type: python, path: predictor.py}",
    extra: str = "",
) -> str:
    return f"name: {name}\nkind: BatchAPI\npredictor: {predictor}\n{extra}"


def spec_error(text: str) -> str:
    with pytest.raises(errors.InvalidSpec) as info:
        load_config_file(text)
    assert info.value.kind == "spec.invalid"
    return info.value.message


# ---------------------------------------------------------------------------------------------
# cortex.yaml


class TestLoadConfigFile:
    def test_minimal_list(self) -> None:
        specs = load_config_file(MINIMAL)
        assert len(specs) == 1
        api = specs[0]
        assert api.name == "image-classifier"
        assert api.kind == "BatchAPI"
        assert api.predictor.type == "python"
        assert api.predictor.path == "predictor.py"
        assert api.compute.cpu_cores == 1.0

    def test_defaults(self) -> None:
        (api,) = load_config_file(api_yaml())
        assert api.predictor.config == {}
        assert api.predictor.env == {}
        assert api.predictor.python_path is None
        assert api.compute.cpu == "200m"
        assert api.compute.cpu_cores == pytest.approx(0.2)
        assert api.compute.mem is None
        assert api.compute.mem_bytes is None
        assert api.compute.gpu == 0

    def test_single_mapping_is_one_api(self) -> None:
        specs = load_config_file(api_yaml(name="solo"))
        assert [s.name for s in specs] == ["solo"]

    def test_several_apis_keep_their_order(self) -> None:
        text = (
            "- name: b-api\n  kind: BatchAPI\n  predictor: {type: python, path: b.py}\n"
            "- name: a-api\n  kind: BatchAPI\n  predictor: {type: python, path: a.py}\n"
        )
        specs = load_config_file(text)
        assert [(s.name, s.predictor.path) for s in specs] == [
            ("b-api", "b.py"),
            ("a-api", "a.py"),
        ]

    def test_null_config_and_env_become_empty(self) -> None:
        (api,) = load_config_file(
            api_yaml(predictor="{type: python, path: p.py, config: null, env: null}")
        )
        assert api.predictor.config == {}
        assert api.predictor.env == {}

    def test_config_and_env_values_kept(self) -> None:
        text = api_yaml(
            predictor=(
                "{type: python, path: p.py, config: {a: {b: [1, 2]}, c: x}, "
                "env: {FOO: bar, _X1: 'y'}}"
            )
        )
        (api,) = load_config_file(text)
        assert api.predictor.config == {"a": {"b": [1, 2]}, "c": "x"}
        assert api.predictor.env == {"FOO": "bar", "_X1": "y"}

    def test_to_json_round_trips(self) -> None:
        (api,) = load_config_file(MINIMAL)
        data = api.to_json()
        json.dumps(data)  # plain JSON types only
        assert data["name"] == "image-classifier"
        assert data["predictor"]["path"] == "predictor.py"
        assert load_config_file(json.dumps(data))[0] == api

    @pytest.mark.parametrize("text", ["", "   \n", "[]", "42", "'just a string'"])
    def test_not_a_list_of_apis(self, text: str) -> None:
        assert "expected a list of APIs" in spec_error(text)

    def test_list_entry_not_a_mapping(self) -> None:
        assert "an API must be a mapping" in spec_error("- 1\n")

    def test_invalid_yaml(self) -> None:
        message = spec_error("name: [unclosed\nkind: BatchAPI\n")
        assert message.startswith("cortex.yaml: not valid YAML")

    def test_filename_used_in_messages(self) -> None:
        with pytest.raises(errors.InvalidSpec) as info:
            load_config_file("", filename="apis/custom.yaml")
        assert info.value.message.startswith("apis/custom.yaml: ")

    def test_duplicate_names(self) -> None:
        text = (
            "- name: dup\n  kind: BatchAPI\n  predictor: {type: python, path: a.py}\n"
            "- name: other\n  kind: BatchAPI\n  predictor: {type: python, path: a.py}\n"
            "- name: dup\n  kind: BatchAPI\n  predictor: {type: python, path: b.py}\n"
        )
        message = spec_error(text)
        assert "'dup'" in message
        assert "more than once" in message


class TestApiFields:
    def test_unknown_predictor_key_named(self) -> None:
        message = spec_error(api_yaml(predictor="{type: python, path: p.py, bogus: 1}"))
        assert message == "cortex.yaml: api 'my-api': predictor.bogus: unknown key"

    def test_unknown_top_level_key_named(self) -> None:
        message = spec_error(api_yaml(extra="autoscaling: {min_replicas: 1}\n"))
        assert message.endswith("autoscaling: unknown key")

    def test_unknown_compute_key_named(self) -> None:
        message = spec_error(api_yaml(extra="compute: {cpu: 1, tpu: 2}\n"))
        assert message.endswith("compute.tpu: unknown key")

    def test_missing_predictor_path(self) -> None:
        message = spec_error(api_yaml(predictor="{type: python}"))
        assert message == "cortex.yaml: api 'my-api': predictor.path: required key is missing"

    def test_missing_predictor(self) -> None:
        message = spec_error("name: x\nkind: BatchAPI\n")
        assert message.endswith("predictor: required key is missing")

    def test_missing_name(self) -> None:
        message = spec_error("kind: BatchAPI\npredictor: {type: python, path: p.py}\n")
        assert message == "cortex.yaml: name: required key is missing"

    @pytest.mark.parametrize("kind", ["RealtimeAPI", "TrafficSplitter", "batchapi", "''"])
    def test_kind_must_be_batch_api(self, kind: str) -> None:
        text = f"name: x\nkind: {kind}\npredictor: {{type: python, path: p.py}}\n"
        message = spec_error(text)
        assert "kind: must be BatchAPI" in message

    def test_missing_kind(self) -> None:
        message = spec_error("name: x\npredictor: {type: python, path: p.py}\n")
        assert message.endswith("kind: required key is missing")

    @pytest.mark.parametrize("ptype", ["Python", "''", "pytorch"])
    def test_predictor_type_is_one_of_three(self, ptype: str) -> None:
        message = spec_error(api_yaml(predictor=f"{{type: {ptype}, path: p.py}}"))
        assert "predictor.type:" in message
        assert "python" in message and "onnx" in message and "tensorflow" in message


def model_api(predictor: str) -> str:
    return api_yaml(predictor="{path: p.py, " + predictor + "}")


class TestModels:
    """The spec's rules for tensorflow and onnx models (§2), each a refusal naming its field."""

    @pytest.mark.parametrize("ptype", ["onnx", "tensorflow"])
    def test_a_model_is_required(self, ptype: str) -> None:
        message = spec_error(model_api(f"type: {ptype}"))
        assert message.endswith(
            f"predictor: type {ptype} needs exactly one of model_path or models"
        )

    def test_not_both_model_path_and_models(self) -> None:
        message = spec_error(model_api("type: onnx, model_path: a.onnx, models: {path: b.onnx}"))
        assert "exactly one of model_path or models (both are given)" in message

    @pytest.mark.parametrize("key", ["model_path: m.onnx", "models: {path: m}", "signature_key: s"])
    def test_python_takes_no_model(self, key: str) -> None:
        message = spec_error(model_api(f"type: python, {key}"))
        assert "only for type tensorflow or onnx, not python" in message
        assert message.split("predictor: ")[1].startswith(key.split(":")[0])

    @pytest.mark.parametrize(
        "models",
        [
            "signature_key: s, model_path: m.onnx",
            "models: {path: m.onnx, signature_key: s}",
            "models: {paths: [{name: a, path: a.onnx, signature_key: s}]}",
        ],
    )
    def test_signature_key_only_for_tensorflow(self, models: str) -> None:
        message = spec_error(model_api(f"type: onnx, {models}"))
        assert "signature_key: only for type tensorflow, not onnx" in message

    def test_model_names_are_unique(self) -> None:
        text = model_api("type: onnx, models: {paths: [{name: a, path: x}, {name: a, path: y}]}")
        message = spec_error(text)
        assert "predictor.models: paths: the model name 'a' is used twice" in message

    def test_v020_model_list_is_read_as_paths(self) -> None:
        [api] = load_config_file(
            model_api(
                "type: tensorflow, models: [{name: a, model_path: s3://b/a/, signature_key: k},"
                " {name: b, model_path: b/}]"
            )
        )
        models = [(m.name, m.path, m.signature_key) for m in api.predictor.model_list()]
        assert models == [("a", "s3://b/a/", "k"), ("b", "b", None)]

    def test_signature_keys_fall_back_from_model_to_models_to_the_top(self) -> None:
        [api] = load_config_file(model_api("type: tensorflow, model_path: m/, signature_key: t"))
        assert [m.signature_key for m in api.predictor.model_list()] == ["t"]
        [api] = load_config_file(
            model_api(
                "type: tensorflow, signature_key: t, models: {signature_key: m, paths: "
                "[{name: a, path: a/, signature_key: own}, {name: b, path: b/}]}"
            )
        )
        assert [m.signature_key for m in api.predictor.model_list()] == ["own", "m"]

    def test_a_single_model_has_no_name(self) -> None:
        for predictor in ("model_path: m.onnx", "models: {path: m.onnx}"):
            [api] = load_config_file(model_api(f"type: onnx, {predictor}"))
            assert [(m.name, m.path) for m in api.predictor.model_list()] == [("", "m.onnx")]

    def test_models_needs_path_or_paths(self) -> None:
        assert "give exactly one of path or paths" in spec_error(
            model_api("type: onnx, models: {path: a, paths: [{name: b, path: b}]}")
        )
        assert "paths: list at least one model" in spec_error(
            model_api("type: onnx, models: {paths: []}")
        )

    @pytest.mark.parametrize(
        ("path", "why"),
        [
            ("ftp://host/m.onnx", "a model URL must start with one of"),
            ("../m.onnx", "must stay inside the project folder"),
        ],
    )
    def test_model_locations(self, path: str, why: str) -> None:
        assert why in spec_error(model_api(f"type: onnx, model_path: '{path}'"))

    def test_a_python_spec_reads_as_before(self) -> None:
        [api] = load_config_file(api_yaml())
        assert set(api.to_json()["predictor"]) == {"type", "path", "config", "python_path", "env"}

    def test_predictor_type_missing(self) -> None:
        message = spec_error(api_yaml(predictor="{path: p.py}"))
        assert message.endswith("predictor.type: required key is missing")


class TestNames:
    @pytest.mark.parametrize("name", ["a", "my-api", "a1", "x-2-y", "a" * MAX_NAME_LENGTH])
    def test_valid(self, name: str) -> None:
        assert load_config_file(api_yaml(name=name))[0].name == name

    @pytest.mark.parametrize(
        "name",
        ["MyApi", "my_api", "1api", "-api", "api-", "my.api", "my api", "ünicode", "abc\n", "a-"],
    )
    def test_not_dns_1035(self, name: str) -> None:
        message = spec_error(api_yaml(name=json.dumps(name)))
        assert "name: must be a DNS-1035 label" in message

    def test_too_long(self) -> None:
        message = spec_error(api_yaml(name="a" * (MAX_NAME_LENGTH + 1)))
        assert f"name: must be at most {MAX_NAME_LENGTH} characters" in message

    @pytest.mark.parametrize("name", ["healthz", "docs", "metrics", "openapi", "batch"])
    def test_reserved(self, name: str) -> None:
        assert name in RESERVED_NAMES
        message = spec_error(api_yaml(name=name))
        assert f"'{name}' is reserved" in message

    def test_empty_name(self) -> None:
        assert "name:" in spec_error(api_yaml(name="''"))

    def test_non_string_name(self) -> None:
        message = spec_error(api_yaml(name="123"))
        assert "name:" in message
        assert "string" in message


class TestPredictorPaths:
    @pytest.mark.parametrize(
        ("given", "stored"),
        [
            ("predictor.py", "predictor.py"),
            ("./predictor.py", "predictor.py"),
            ("src/pred.py", "src/pred.py"),
            ("src/../pred.py", "pred.py"),
        ],
    )
    def test_path_normalised(self, given: str, stored: str) -> None:
        (api,) = load_config_file(api_yaml(predictor=f"{{type: python, path: '{given}'}}"))
        assert api.predictor.path == stored

    @pytest.mark.parametrize("path", ["/abs/predictor.py", "/predictor.py"])
    def test_absolute_refused(self, path: str) -> None:
        message = spec_error(api_yaml(predictor=f"{{type: python, path: '{path}'}}"))
        assert "predictor.path: the predictor path must be a relative path" in message

    @pytest.mark.parametrize("path", ["../predictor.py", "a/../../predictor.py", "../x/p.py"])
    def test_parent_refused(self, path: str) -> None:
        message = spec_error(api_yaml(predictor=f"{{type: python, path: '{path}'}}"))
        assert "predictor.path: the predictor path must stay inside the project folder" in message

    @pytest.mark.parametrize("path", ["predictor.txt", "predictor", "src/"])
    def test_must_be_py_file(self, path: str) -> None:
        message = spec_error(api_yaml(predictor=f"{{type: python, path: '{path}'}}"))
        assert "predictor.path: must be a .py file" in message

    def test_empty_path(self) -> None:
        message = spec_error(api_yaml(predictor="{type: python, path: ''}"))
        assert "predictor.path:" in message

    def test_backslash_refused(self) -> None:
        message = spec_error(api_yaml(predictor="{type: python, path: 'src\\pred.py'}"))
        assert "predictor.path:" in message

    @pytest.mark.parametrize(
        ("given", "stored"),
        [("lib", "lib/"), ("lib/", "lib/"), ("./lib", "lib/"), ("a/b/", "a/b/")],
    )
    def test_python_path_gets_trailing_slash(self, given: str, stored: str) -> None:
        text = api_yaml(predictor=f"{{type: python, path: p.py, python_path: '{given}'}}")
        assert load_config_file(text)[0].predictor.python_path == stored

    @pytest.mark.parametrize("given", [".", "./", "./.", "lib/.."])
    def test_python_path_root_refused(self, given: str) -> None:
        text = api_yaml(predictor=f"{{type: python, path: p.py, python_path: '{given}'}}")
        message = spec_error(text)
        assert "predictor.python_path: may not be the project root" in message

    @pytest.mark.parametrize("given", ["/usr/lib", "../lib", "lib/../../x"])
    def test_python_path_outside_refused(self, given: str) -> None:
        text = api_yaml(predictor=f"{{type: python, path: p.py, python_path: '{given}'}}")
        assert "predictor.python_path: python_path must" in spec_error(text)


class TestEnv:
    @pytest.mark.parametrize("key", ["CORTEX_FOO", "CORTEX_", "cortex_foo"])
    def test_cortex_prefix_refused(self, key: str) -> None:
        text = api_yaml(predictor=f"{{type: python, path: p.py, env: {{{key}: x}}}}")
        message = spec_error(text)
        assert "predictor.env:" in message
        assert f"'{key}': keys may not start with CORTEX_" in message

    def test_cortex_inside_key_allowed(self) -> None:
        text = api_yaml(predictor="{type: python, path: p.py, env: {MY_CORTEX_X: y}}")
        assert load_config_file(text)[0].predictor.env == {"MY_CORTEX_X": "y"}

    @pytest.mark.parametrize("key", ["'1ABC'", "'A-B'", "'A B'", "''", '"FOO\\n"'])
    def test_bad_variable_names(self, key: str) -> None:
        text = api_yaml(predictor=f"{{type: python, path: p.py, env: {{{key}: x}}}}")
        message = spec_error(text)
        assert "predictor.env:" in message
        assert "is not a valid environment variable name" in message

    def test_non_string_value_refused(self) -> None:
        text = api_yaml(predictor="{type: python, path: p.py, env: {FOO: [1]}}")
        assert "predictor.env.FOO:" in spec_error(text)


class TestCompute:
    @pytest.mark.parametrize(
        ("cpu", "cores"),
        [("20m", 0.02), ("200m", 0.2), ("1", 1.0), ("1.5", 1.5), ("2", 2.0), ("0.5", 0.5)],
    )
    def test_cpu_quantities(self, cpu: str, cores: float) -> None:
        (api,) = load_config_file(api_yaml(extra=f"compute: {{cpu: {cpu}}}\n"))
        assert api.compute.cpu_cores == pytest.approx(cores)

    @pytest.mark.parametrize("cpu", ["19m", "0.01", "0", "1m"])
    def test_cpu_below_20m(self, cpu: str) -> None:
        message = spec_error(api_yaml(extra=f"compute: {{cpu: {cpu}}}\n"))
        assert "compute.cpu: must be at least 20m" in message

    @pytest.mark.parametrize("cpu", ["abc", "1 core", "'-1'", "1e3", "1Mi5", "'m'", "''"])
    def test_cpu_bad_quantity(self, cpu: str) -> None:
        message = spec_error(api_yaml(extra=f"compute: {{cpu: {cpu}}}\n"))
        assert "compute.cpu:" in message
        assert "is not a quantity" in message

    def test_cpu_negative_number(self) -> None:
        message = spec_error(api_yaml(extra="compute: {cpu: -1}\n"))
        assert "compute.cpu: must be a positive quantity" in message

    @pytest.mark.parametrize("field", ["cpu", "mem", "gpu"])
    def test_booleans_are_not_quantities(self, field: str) -> None:
        message = spec_error(api_yaml(extra=f"compute: {{{field}: true}}\n"))
        assert f"compute.{field}:" in message

    @pytest.mark.parametrize(
        ("mem", "size"),
        [("20Mi", 20 << 20), ("512Mi", 512 << 20), ("2Gi", 2 << 30), ("1G", 10**9)],
    )
    def test_mem_quantities(self, mem: str, size: int) -> None:
        (api,) = load_config_file(api_yaml(extra=f"compute: {{mem: {mem}}}\n"))
        assert api.compute.mem_bytes == size

    @pytest.mark.parametrize("mem", ["19Mi", "20M", "1Ki", "1000"])
    def test_mem_below_20mi(self, mem: str) -> None:
        message = spec_error(api_yaml(extra=f"compute: {{mem: {mem}}}\n"))
        assert "compute.mem: must be at least 20Mi" in message

    def test_mem_bad_quantity(self) -> None:
        message = spec_error(api_yaml(extra="compute: {mem: lots}\n"))
        assert "compute.mem:" in message
        assert "is not a quantity" in message

    @pytest.mark.parametrize("gpu", [0, 1, 4])
    def test_gpu(self, gpu: int) -> None:
        (api,) = load_config_file(api_yaml(extra=f"compute: {{gpu: {gpu}}}\n"))
        assert api.compute.gpu == gpu

    def test_gpu_negative(self) -> None:
        message = spec_error(api_yaml(extra="compute: {gpu: -1}\n"))
        assert "compute.gpu:" in message
        assert "greater than or equal to 0" in message

    def test_gpu_not_a_number(self) -> None:
        assert "compute.gpu:" in spec_error(api_yaml(extra="compute: {gpu: many}\n"))


# ---------------------------------------------------------------------------------------------
# Job submissions


def submission(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"workers": 1, "item_list": {"items": [1, 2, 3], "batch_size": 2}}
    body.update(overrides)
    return body


def submission_error(data: Any) -> errors.CortexError:
    with pytest.raises(errors.CortexError) as info:
        parse_submission(data)
    return info.value


class TestParseSubmission:
    def test_valid(self) -> None:
        sub = parse_submission(
            submission(workers=3, config={"a": 1}, timeout=60, max_attempts=2, extra="ignored")
        )
        assert sub.workers == 3
        assert sub.config == {"a": 1}
        assert sub.timeout == 60
        assert sub.max_attempts == 2
        assert sub.item_list is not None
        assert sub.item_list.items == [1, 2, 3]
        assert sub.item_list.batch_size == 2

    def test_defaults(self) -> None:
        sub = parse_submission(submission())
        assert sub.config is None
        assert sub.timeout is None
        assert sub.max_attempts == 3

    def test_null_dataset_keys_count_as_absent(self) -> None:
        sub = parse_submission(submission(file_path_lister=None, delimited_files=None))
        assert sub.item_list is not None

    @pytest.mark.parametrize("body", [[], "text", 1, None, True, [{"workers": 1}]])
    def test_body_must_be_object(self, body: Any) -> None:
        err = submission_error(body)
        assert isinstance(err, errors.InvalidRequest)
        assert err.kind == "request.invalid"

    def test_no_dataset_key(self) -> None:
        err = submission_error({"workers": 1})
        assert isinstance(err, errors.InvalidSubmission)
        assert err.kind == "batchapi.specify_exactly_one_key"
        assert err.message == (
            "specify exactly one of the following keys: item_list, file_path_lister, or "
            "delimited_files"
        )

    def test_no_dataset_key_checked_before_workers(self) -> None:
        assert submission_error({}).kind == "batchapi.specify_exactly_one_key"

    @pytest.mark.parametrize(
        "keys",
        [
            ("item_list", "file_path_lister"),
            ("item_list", "delimited_files"),
            ("file_path_lister", "delimited_files"),
            ("item_list", "file_path_lister", "delimited_files"),
        ],
    )
    def test_conflicting_fields(self, keys: tuple[str, ...]) -> None:
        body: dict[str, Any] = {"workers": 1}
        for key in keys:
            body[key] = {"items": [1], "s3_paths": ["s3://b/k"], "batch_size": 1}
        err = submission_error(body)
        assert err.kind == "batchapi.conflicting_fields"
        for key in keys:
            assert key in err.message

    @pytest.mark.parametrize("key", ["file_path_lister", "delimited_files"])
    def test_file_datasets_parse(self, key: str) -> None:
        body = {"workers": 1, key: {"s3_paths": ["s3://bucket/x"], "batch_size": 3}}
        sub = parse_submission(body)
        assert sub.dataset_kind == key
        assert sub.file_dataset is not None
        assert sub.file_dataset.paths == ["s3://bucket/x"]
        assert sub.file_dataset.to_json()["batch_size"] == 3
        # `paths` is an alias of `s3_paths`; includes and excludes default to none.
        alias = parse_submission({"workers": 1, key: {"paths": ["/data/x"], "batch_size": 1}})
        assert alias.file_dataset is not None
        assert alias.file_dataset.paths == ["/data/x"]
        assert alias.file_dataset.includes == []

    @pytest.mark.parametrize(
        ("dataset", "kind"),
        [
            ({"s3_paths": [], "batch_size": 1}, "batchapi.empty_s3_paths"),
            ({"s3_paths": ["s3://b/x"], "batch_size": 0}, "batchapi.invalid_batch_size"),
            (
                {"s3_paths": ["s3://b/x"], "includes": ["a["], "batch_size": 1},
                "batchapi.invalid_glob",
            ),
            (
                {"s3_paths": ["s3://b/x"], "excludes": ["{a,b"], "batch_size": 1},
                "batchapi.invalid_glob",
            ),
            ({"s3_paths": ["s3:///x"], "batch_size": 1}, "batchapi.invalid_s3_path"),
            ({"s3_paths": ["relative/x"], "batch_size": 1}, "batchapi.invalid_path"),
            ({"s3_paths": ["file://host/x"], "batch_size": 1}, "batchapi.invalid_path"),
            ({"s3_paths": ["ftp://host/x"], "batch_size": 1}, "batchapi.invalid_path"),
            (
                {"s3_paths": ["s3://b/x"], "paths": ["s3://b/y"], "batch_size": 1},
                "batchapi.conflicting_fields",
            ),
        ],
    )
    def test_file_dataset_errors(self, dataset: dict, kind: str) -> None:
        err = submission_error({"workers": 1, "delimited_files": dataset})
        assert err.kind == kind

    def test_empty_items(self) -> None:
        err = submission_error(submission(item_list={"items": [], "batch_size": 1}))
        assert err.kind == "batchapi.empty_item_list"
        assert "item_list.items" in err.message

    @pytest.mark.parametrize("size", [0, -1])
    def test_batch_size_below_one(self, size: int) -> None:
        err = submission_error(submission(item_list={"items": [1], "batch_size": size}))
        assert err.kind == "batchapi.invalid_batch_size"
        assert "item_list.batch_size" in err.message

    @pytest.mark.parametrize("workers", [0, -2])
    def test_workers_below_one(self, workers: int) -> None:
        err = submission_error(submission(workers=workers))
        assert err.kind == "batchapi.invalid_workers"
        assert err.message.startswith("workers:")

    def test_workers_missing_counts_as_zero(self) -> None:
        body = submission()
        del body["workers"]
        assert submission_error(body).kind == "batchapi.invalid_workers"

    @pytest.mark.parametrize("timeout", [0, -5])
    def test_timeout_below_one(self, timeout: int) -> None:
        err = submission_error(submission(timeout=timeout))
        assert err.kind == "batchapi.invalid_timeout"

    @pytest.mark.parametrize("attempts", [0, -1])
    def test_max_attempts_below_one(self, attempts: int) -> None:
        assert submission_error(submission(max_attempts=attempts)).kind == (
            "batchapi.invalid_max_attempts"
        )

    def test_order_empty_items_before_batch_size_before_workers(self) -> None:
        body = {"workers": 0, "item_list": {"items": [], "batch_size": 0}}
        assert submission_error(body).kind == "batchapi.empty_item_list"
        body["item_list"]["items"] = [1]
        assert submission_error(body).kind == "batchapi.invalid_batch_size"
        body["item_list"]["batch_size"] = 1
        assert submission_error(body).kind == "batchapi.invalid_workers"
        body["workers"] = 1
        body["timeout"] = 0
        body["max_attempts"] = 0
        assert submission_error(body).kind == "batchapi.invalid_timeout"
        body["timeout"] = 1
        assert submission_error(body).kind == "batchapi.invalid_max_attempts"
        body["max_attempts"] = 1
        assert parse_submission(body).workers == 1

    def test_dataset_checked_before_types(self) -> None:
        err = submission_error({"workers": "two", "item_list": None})
        assert err.kind == "batchapi.specify_exactly_one_key"

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("workers", "two"),
            ("workers", "2"),
            ("workers", True),
            ("workers", False),
            ("workers", 2.0),
            ("workers", 1.5),
            ("workers", [1]),
            ("timeout", "60"),
            ("timeout", True),
            ("max_attempts", "3"),
            ("max_attempts", 2.5),
            ("config", "x"),
            ("config", [1]),
        ],
    )
    def test_wrong_types(self, field: str, value: Any) -> None:
        err = submission_error(submission(**{field: value}))
        assert isinstance(err, errors.InvalidRequest)
        assert err.kind == "request.invalid"
        assert err.message.startswith(f"{field}:")

    @pytest.mark.parametrize(
        ("item_list", "where"),
        [
            ({"items": "abc", "batch_size": 1}, "item_list.items"),
            ({"items": {"a": 1}, "batch_size": 1}, "item_list.items"),
            ({"batch_size": 1}, "item_list.items"),
            ({"items": [1]}, "item_list.batch_size"),
            ({"items": [1], "batch_size": "two"}, "item_list.batch_size"),
            ({"items": [1], "batch_size": "3"}, "item_list.batch_size"),
            ({"items": [1], "batch_size": True}, "item_list.batch_size"),
            ({"items": [1], "batch_size": 1.0}, "item_list.batch_size"),
            ([1, 2], "item_list"),
            ("items", "item_list"),
        ],
    )
    def test_bad_item_list(self, item_list: Any, where: str) -> None:
        err = submission_error(submission(item_list=item_list))
        assert isinstance(err, errors.InvalidRequest)
        assert err.message.startswith(f"{where}:")

    def test_null_timeout_and_config_allowed(self) -> None:
        sub = parse_submission(submission(timeout=None, config=None))
        assert sub.timeout is None
        assert sub.config is None

    def test_errors_serialise_as_kind_and_message(self) -> None:
        err = submission_error({"workers": 1})
        assert err.to_dict() == {"kind": err.kind, "message": err.message}
        assert err.status_code == 400


# ---------------------------------------------------------------------------------------------
# Batching


class TestItemBatches:
    def test_order_and_partial_last_batch(self) -> None:
        items = list(range(7))
        batches = [json.loads(b) for b in item_batches(items, 3)]
        assert batches == [[0, 1, 2], [3, 4, 5], [6]]

    def test_exact_multiple(self) -> None:
        assert [json.loads(b) for b in item_batches([1, 2, 3, 4], 2)] == [[1, 2], [3, 4]]

    def test_batch_size_larger_than_items(self) -> None:
        assert list(item_batches(["a", "b"], 10)) == ['["a","b"]']

    def test_batch_size_one(self) -> None:
        assert list(item_batches([{"x": 1}, None, "s"], 1)) == ['[{"x":1}]', "[null]", '["s"]']

    def test_empty(self) -> None:
        assert list(item_batches([], 5)) == []

    def test_count_is_ceiling(self) -> None:
        items = list(range(101))
        assert len(list(item_batches(items, 10))) == math.ceil(101 / 10)

    def test_json_content_compact_and_exact(self) -> None:
        items = [{"b": 1, "a": [1.5, "x"]}, "ünï", True, None, 3]
        (payload,) = item_batches(items, 5)
        assert payload == '[{"b":1,"a":[1.5,"x"]},"ünï",true,null,3]'
        assert json.loads(payload) == items

    def test_lazy(self) -> None:
        big = "x" * (MAX_ITEM_BYTES + 10)
        batches = item_batches(["ok", big], 1)
        assert next(batches) == '["ok"]'  # the oversized item is found only when reached
        with pytest.raises(errors.InvalidSubmission):
            next(batches)

    def test_item_exactly_at_limit_allowed(self) -> None:
        item = "x" * (MAX_ITEM_BYTES - 2)  # two quotes make it exactly the limit
        assert len(json.dumps(item)) == MAX_ITEM_BYTES
        (payload,) = item_batches([item], 1)
        assert json.loads(payload) == [item]

    def test_item_over_limit(self) -> None:
        item = "x" * (MAX_ITEM_BYTES - 1)  # raw JSON is limit + 1 bytes
        items = ["a", "b", "c", item, "d"]
        with pytest.raises(errors.InvalidSubmission) as info:
            list(item_batches(items, 2))
        assert info.value.kind == "batchapi.item_size_exceeds_limit"
        assert info.value.message == (
            f"item 3 has size {MAX_ITEM_BYTES + 1} bytes which exceeds the limit "
            f"({MAX_ITEM_BYTES} bytes)"
        )

    def test_item_over_limit_counted_in_utf8_bytes(self) -> None:
        item = "é" * 140_000  # 140002 characters of JSON, but 280002 bytes
        with pytest.raises(errors.InvalidSubmission) as info:
            list(item_batches(["ok", item], 5))
        assert info.value.kind == "batchapi.item_size_exceeds_limit"
        assert info.value.message.startswith("item 1 has size 280002 bytes")

    def test_many_small_items_over_limit_together_are_fine(self) -> None:
        items = ["y" * 1000] * 300  # the batch is over the limit, no item is
        (payload,) = item_batches(items, 300)
        assert len(payload) > MAX_ITEM_BYTES
        assert json.loads(payload) == items


# ---------------------------------------------------------------------------------------------
# Config merging and quantities


class TestDeepMerge:
    def test_nested_dicts_merge(self) -> None:
        base = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": 1}
        job = {"a": {"y": {"q": 20, "r": 30}, "z": 3}}
        assert deep_merge(base, job) == {
            "a": {"x": 1, "y": {"p": 1, "q": 20, "r": 30}, "z": 3},
            "b": 1,
        }

    def test_job_wins(self) -> None:
        assert deep_merge({"a": 1, "b": "x"}, {"a": 2}) == {"a": 2, "b": "x"}

    def test_non_dict_replaced(self) -> None:
        base = {"list": [1, 2], "d": {"k": 1}, "s": {"k": 1}}
        job = {"list": [3], "d": "scalar", "s": None}
        assert deep_merge(base, job) == {"list": [3], "d": "scalar", "s": None}

    def test_dict_replaces_scalar(self) -> None:
        assert deep_merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}

    def test_lists_not_concatenated(self) -> None:
        assert deep_merge({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}

    @pytest.mark.parametrize("override", [None, {}])
    def test_no_override(self, override: dict[str, Any] | None) -> None:
        base = {"a": {"b": 1}}
        merged = deep_merge(base, override)
        assert merged == base
        assert merged is not base
        assert merged["a"] is not base["a"]

    def test_inputs_not_mutated(self) -> None:
        base = {"a": {"x": [1], "y": 2}, "b": {"c": 1}}
        job = {"a": {"y": 3, "z": {"deep": [1]}}, "new": [4]}
        base_before, job_before = copy.deepcopy(base), copy.deepcopy(job)
        merged = deep_merge(base, job)
        assert base == base_before
        assert job == job_before
        merged["a"]["x"].append(99)
        merged["a"]["z"]["deep"].append(99)
        merged["new"].append(99)
        merged["b"]["c"] = 42
        assert base == base_before
        assert job == job_before


class TestParseQuantity:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("200m", 0.2),
            ("20m", 0.02),
            ("1", 1.0),
            ("1.5", 1.5),
            (".5", 0.5),
            ("512Mi", 512 * (1 << 20)),
            ("1Ki", 1024),
            ("2Gi", 2 * (1 << 30)),
            ("1Ti", 1 << 40),
            ("2G", 2e9),
            ("3M", 3e6),
            ("4k", 4000),
            ("1T", 1e12),
            (" 2Gi ", 2 * (1 << 30)),
            (0, 0.0),
            (3, 3.0),
            (0.25, 0.25),
        ],
    )
    def test_valid(self, value: str | int | float, expected: float) -> None:
        result = parse_quantity(value)
        assert isinstance(result, float)
        assert result == pytest.approx(expected)

    @pytest.mark.parametrize(
        "value", ["", "abc", "1.5.5", "-1", "1e3", "1mi", "1 Gi", "Gi", "1KiB", "m", "1."]
    )
    def test_bad_strings(self, value: str) -> None:
        with pytest.raises(ValueError, match="is not a quantity"):
            parse_quantity(value)

    @pytest.mark.parametrize("value", [-1, -0.5, math.nan, math.inf, -math.inf])
    def test_bad_numbers(self, value: float) -> None:
        with pytest.raises(ValueError, match="positive quantity"):
            parse_quantity(value)

    @pytest.mark.parametrize("value", [True, False])
    def test_booleans(self, value: bool) -> None:
        with pytest.raises(ValueError):
            parse_quantity(value)


def test_lone_surrogates_are_refused_as_invalid_items() -> None:
    batches = item_batches(["ok", "\ud800"], 1)
    assert next(batches) == '["ok"]'
    with pytest.raises(errors.InvalidSubmission) as err:
        next(batches)
    assert err.value.kind == "batchapi.invalid_item"


def test_numeric_env_values_become_text() -> None:
    [api] = spec.load_config_file(
        "- name: a\n  kind: BatchAPI\n  predictor: {type: python, path: p.py, env: {N: 4}}\n"
    )
    assert api.predictor.env == {"N": "4"}


def test_env_values_may_not_hold_null_characters() -> None:
    with pytest.raises(errors.InvalidSpec) as err:
        spec.parse_api_spec(
            {
                "name": "a",
                "kind": "BatchAPI",
                "predictor": {"type": "python", "path": "p.py", "env": {"X": "a\0b"}},
            }
        )
    assert "null character" in err.value.message
