"""What a worker needs on this machine before it starts: its API version's environment
(`cortex.environments`) and its models (`cortex.modelcache`).

`Preparation.ready` answers at once whether both are there; `prepare` makes them so on a thread
of its own (a build can take minutes, a model download too), then calls back: the job's workers
wait meanwhile as `pending`, and a build or a download that fails fails the job with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cortex import environments, modelcache, spec

log = logging.getLogger("cortex.server")


@dataclasses.dataclass(frozen=True)
class Ready:
    """An API version, ready to run here: its environment (None: the server's interpreter)
    and its models, each `{name, path, signature_key}` with `local_path` where the server
    fetched it."""

    env_dir: Path | None
    models: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Failure:
    kind: str
    message: str


class Preparation:
    def __init__(
        self,
        envs: environments.Environments,
        models: modelcache.ModelCache,
        env_definition: Callable[[str], tuple[str | None, tuple[str, ...]]],
        project_dir: Callable[[str], Path],
    ) -> None:
        self.envs = envs
        self.models = models
        self._env_definition = env_definition
        self._project_dir = project_dir
        # A version's models, once made local: a spec id names one immutable version.
        self._local_models: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def ready(self, spec_id: str, api: spec.APISpec) -> Ready | None:
        """The version's environment and models if both are on this machine, else None."""
        key, _ = self._env_definition(spec_id)
        env_dir = None
        if key is not None:
            if self.envs.python(key) is None:
                return None
            env_dir = self.envs.path(key)
        models = self._ready_models(spec_id, api)
        return None if models is None else Ready(env_dir, models)

    def _ready_models(self, spec_id: str, api: spec.APISpec) -> list[dict[str, Any]] | None:
        entries = [m.model_dump() for m in api.predictor.model_list()]
        if not any(_fetched(m["path"]) for m in entries):
            return entries  # all in the project folder
        with self._lock:
            return self._local_models.get(spec_id)

    def prepare(
        self,
        spec_id: str,
        api: spec.APISpec,
        say: Callable[[str], None],
        done: Callable[[Ready | Failure], None],
    ) -> None:
        """Build the environment and fetch the models on a thread, then `done`."""

        def run() -> None:
            try:
                outcome = self._prepare(spec_id, api, say)
            except Exception as err:  # never leave the job waiting for nothing
                log.exception("version %s: cannot prepare its workers", spec_id)
                outcome = Failure("batchapi.launch_failed", f"cannot prepare the workers: {err}")
            try:
                done(outcome)
            except Exception:
                log.exception("version %s: cannot start its workers", spec_id)

        threading.Thread(target=run, name=f"cortex-prepare-{spec_id[:8]}", daemon=True).start()

    def _prepare(
        self, spec_id: str, api: spec.APISpec, say: Callable[[str], None]
    ) -> Ready | Failure:
        key, extra = self._env_definition(spec_id)
        env_dir = None
        if key is not None:
            if self.envs.python(key) is None:
                say(
                    f"waiting for the environment of api {api.name} to be built ({key}); the "
                    f"workers start once it is ready (cortex get {api.name} shows the build)"
                )
                self.envs.build(key, self._project_dir(spec_id), extra=extra, retry_failed=False)
                status = self.envs.wait(key)
                if status.state != environments.READY:
                    return Failure(
                        "batchapi.environment_failed",
                        f"the environment of api {api.name} failed to build: "
                        f"{status.message or status.state}",
                    )
                say(f"environment {key} is ready")
            env_dir = self.envs.path(key)
        models = self._ready_models(spec_id, api)
        if models is None:
            models = []
            for model in api.predictor.model_list():
                entry = model.model_dump()
                if _fetched(model.path):
                    label = f"model {model.name!r}" if model.name else "the model"
                    say(f"fetching {label} from {model.path}")
                    try:
                        entry["local_path"] = str(self.models.fetch(model.path))
                    except Exception as err:
                        reason = getattr(err, "message", None) or str(err)
                        return Failure(
                            "batchapi.model_fetch_failed", f"cannot fetch {label}: {reason}"
                        )
                models.append(entry)
            with self._lock:
                self._local_models[spec_id] = models
        return Ready(env_dir, models)


def _fetched(path: str) -> bool:
    """Whether the server makes a model local (a URL or an absolute path), rather than the
    worker reading it in its project folder."""
    return "://" in path or path.startswith("/")
