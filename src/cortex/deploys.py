"""Deploys: API versions, their environments and builds, their unpacked projects."""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path
from typing import Any

from cortex import envfiles, environments, errors, project, spec
from cortex.jobs import JobStatus
from cortex.launchers import Launcher
from cortex.lifecycle import Lifecycle
from cortex.settings import Settings
from cortex.store import ApiRecord, Store

log = logging.getLogger("cortex.server")


class Deploys:
    def __init__(
        self, settings: Settings, store: Store, launcher: Launcher, lifecycle: Lifecycle
    ) -> None:
        self.settings = settings
        self.store = store
        self.launcher = launcher
        self.lifecycle = lifecycle
        self.environments = environments.Environments(
            settings.data_dir / "envs",
            settings.data_dir / "cache",
            budget_bytes=settings.env_cache_bytes,
            build_timeout_s=settings.env_build_timeout_s,
            installer=settings.env_installer,
        )
        # A version's environment (key, extra requirements) and .env, read once from its
        # (immutable) project.
        self._env_definitions: dict[str, tuple[str | None, tuple[str, ...]]] = {}
        self.projects = project.Projects(settings.data_dir / "projects", settings.max_project_bytes)
        self._dotenvs: dict[str, dict[str, str]] = {}

    def deploy(self, spec_data: Any, archive: bytes) -> tuple[str, str, dict[str, Any]]:
        """Validate and store an API, and start building its environment if it needs one that
        is not built; returns (result as `put_api` gives it, name, the environment's state).

        A version whose environment is not built is the API's pending version until it is:
        the version that served goes on serving new jobs only if the build fails."""
        api = spec.parse_api_spec(spec_data)
        names = project.archive_names(archive, self.settings.max_project_bytes)
        if api.predictor.path not in names:
            raise errors.InvalidSpec(
                f"api {api.name!r}: predictor.path: {api.predictor.path} is not in the project "
                "folder (or is excluded by .cortexignore)"
            )
        for path in spec.missing_model_files(api, names):
            raise errors.InvalidSpec(
                f"api {api.name!r}: predictor: the model {path} is not a file or folder in the "
                "project (or is excluded by .cortexignore)"
            )
        spec_json = api.to_json()
        spec_id = spec.digest(spec.canonical_json(spec_json), archive)[:32]
        # Unpacked and not yet stored: a prune of unused folders must leave it alone.
        with self.projects.deploying(spec_id) as project_dir:
            unpacked = project_dir.is_dir()
            self.projects.extract(spec_id, archive)
            try:
                envfiles.check_project(project_dir)
            except errors.CortexError:
                if not unpacked:  # a refused deploy leaves nothing behind
                    shutil.rmtree(project_dir, ignore_errors=True)
                raise
            key, extra = self.env_definition(spec_id, api)
            status = self.environments.status(key)
            cached = status.state in (environments.READY, environments.NONE)
            result = self.store.put_api(api.name, spec_id, spec_json, archive, pending=not cached)
        if not cached:
            assert key is not None
            status = self.environments.build(
                key, project_dir, lambda done: self._built(api.name, spec_id, done), extra=extra
            )
            log.info("api %s: building environment %s", api.name, key)
        return result, api.name, {"spec_id": spec_id, **status.to_json(), "cached": cached}

    def _built(self, name: str, spec_id: str, status: environments.Status) -> None:
        """A deploy's build ended: the version serves, or the one before it goes on serving."""
        if status.state not in (environments.READY, environments.FAILED):
            return
        error = None if status.state == environments.READY else (status.message or "failed")
        try:
            if self.store.finish_build(name, spec_id, error):
                log.info(
                    "api %s: version %s %s",
                    name,
                    spec_id,
                    "serves"
                    if error is None
                    else f"failed to build; the previous version goes on serving: {error[:300]}",
                )
            self.prune_environments()
        except Exception:
            log.exception("api %s: cannot record the end of its environment build", name)

    def resume_builds(self) -> None:
        """At start-up: builds that a stopped server left unfinished start again."""
        for api in self.store.list_apis():
            if api.pending_spec_id is None or api.pending_error is not None:
                continue
            key, extra = self.env_definition(api.pending_spec_id)
            if key is None:
                continue
            self.environments.build(
                key,
                self.project_dir(api.pending_spec_id),
                functools.partial(self._built, api.name, api.pending_spec_id),
                extra=extra,
            )

    def env_definition(
        self, spec_id: str, api: spec.APISpec | None = None
    ) -> tuple[str | None, tuple[str, ...]]:
        """A version's environment: its key (None: the server's interpreter runs it) and the
        requirements the server adds to the project's (the model runtime of its type)."""
        if spec_id not in self._env_definitions:
            if api is None:
                api = spec.APISpec.model_validate(self.store.get_spec_json(spec_id))
            project_dir = self.project_dir(spec_id)
            extra = envfiles.runtime_requirements(api.predictor.type, api.compute.gpu, project_dir)
            self._env_definitions[spec_id] = (envfiles.key_for(project_dir, extra), extra)
        return self._env_definitions[spec_id]

    def env_key(self, spec_id: str) -> str | None:
        return self.env_definition(spec_id)[0]

    def api_environment(self, api: ApiRecord) -> dict[str, Any]:
        """The environment of the API's latest deploy: building, ready, failed (with the
        installer's message) or none (the server's interpreter runs it).

        A pending version is `building` until its outcome is in the store, not merely on disk:
        who sees `ready` or `failed` sees the version that serves new jobs already chosen."""
        spec_id = api.latest_spec_id
        key = self.env_key(spec_id)
        if api.pending_error is not None:
            status = environments.Status(key, environments.FAILED, api.pending_error)
        elif api.pending_spec_id is not None:
            status = environments.Status(key, environments.BUILDING)
        else:
            status = self.environments.status(key)
        return {"spec_id": spec_id, **status.to_json()}

    def prune_environments(self) -> list[str]:
        in_use = {self.env_key(spec_id) for spec_id in self.store.spec_ids_in_use()}
        return self.environments.prune({key for key in in_use if key is not None})

    def build_log(self, key: str, since: int) -> tuple[list[str], int]:
        """An environment's build log from line `since` on, and where the next read starts."""
        return self.environments.log_lines(key, since)

    def get_api(self, name: str) -> ApiRecord:
        return self.lifecycle.get_api(name)

    def list_apis(self) -> list[ApiRecord]:
        return self.store.list_apis()

    def delete_api(self, name: str) -> None:
        self.lifecycle.get_api(name)
        for job in self.store.list_jobs(name, limit=1_000_000):
            if job.status.in_progress:
                self.lifecycle.end_job(job.job_id, JobStatus.STOPPED)
        for job_id in self.launcher.job_ids():
            other = self.store.get_job(job_id)
            if other is not None and other.api_name == name:
                self.launcher.stop_job(job_id, self.settings.worker_grace_s)
        self.store.delete_api(name)
        log.info("deleted api %s", name)
        self.prune_projects()  # its code, at once: it may be big

    # -- projects ---------------------------------------------------------------------------

    def project_dir(self, spec_id: str) -> Path:
        dest = self.projects.path(spec_id)
        if dest.is_dir():
            return dest
        _, archive = self.store.get_spec(spec_id)
        return self.projects.extract(spec_id, archive)

    def prune_projects(self) -> list[str]:
        """Remove the unpacked projects of versions that nothing uses any more: no API serves
        or builds them, no in-progress job runs them, and no environment build reads them (a
        build is shared by every version with the same environment files, and reads the
        folder of the version that started it, which a later deploy may have replaced)."""

        def in_use() -> set[str]:
            building = {
                spec_id
                for spec_id, (key, _) in list(self._env_definitions.items())
                if key is not None and self.environments.status(key).state == environments.BUILDING
            }
            return self.store.spec_ids_in_use() | building

        return self.projects.prune(in_use)

    def dotenv(self, spec_id: str, project_dir: Path) -> dict[str, str]:
        if spec_id not in self._dotenvs:
            path = project_dir / envfiles.DOTENV
            text = path.read_text(errors="replace") if path.is_file() else ""
            self._dotenvs[spec_id] = envfiles.read_dotenv(text)
        return self._dotenvs[spec_id]
