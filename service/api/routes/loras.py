"""LoRA adapters: `GET /v1/loras` lists what the workers serve (any caller); operators load and
unload adapters at run time (`POST /v1/loras`, `DELETE /v1/loras/{name}`, `ADMIN_API_KEYS` only).

The API never touches an adapter file: it records what is wanted in the adapter registry
(service/adapters.py) and reads back what the workers report. A source is a name in the workers'
`LORA_DIR` or an allowed hub id, never a URL or a path (realcustom/lora/requests.py `check_source`),
and its shapes, dtype and rank are checked by each worker when it loads it.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from realcustom.lora.requests import SourceNotAllowed, check_source
from service.adapters import AdapterRegistry, WorkerAdapters
from service.api.deps import AdaptersDep, Admin, Caller, SettingsDep
from service.api.openapi import ERROR_RESPONSES
from service.errors import ApiError
from service.schemas import AdapterInfo, AdapterListing, AdapterWorker, LoRALoad
from service.settings import Settings

router = APIRouter(prefix="/v1/loras", tags=["adapters"])

# How often `POST /v1/loras` looks at the workers' reports while it waits.
POLL_S = 0.2


def describe(name: str, source: str | None, wanted: bool, reports: list[WorkerAdapters]) -> AdapterInfo:
    """One adapter as the reports show it (see `AdapterInfo.status`)."""
    loaded = [(report.worker, a) for report in reports for a in report.loaded if a.name == name]
    failures = [report.failed[name] for report in reports if name in report.failed]
    failures = [failure for failure in failures if failure.source == source]
    info = AdapterInfo(
        name=name,
        source=source or loaded[0][1].source,
        status="unloading",
        workers=[AdapterWorker(worker=worker, slot=adapter.slot) for worker, adapter in loaded],
    )
    if loaded:
        first = loaded[0][1]
        info.rank, info.modules, info.target_modules = first.rank, first.modules, first.kinds
    if not wanted:
        return info
    if failures:
        info.status, info.error = "failed", failures[0].error
    elif reports and all(report.has(name, source) for report in reports):
        info.status = "loaded"
    else:
        info.status = "loading"
    return info


async def listing(registry: AdapterRegistry, settings: Settings) -> AdapterListing:
    wanted = await registry.wanted()
    reports = await registry.reports()
    names = list(wanted) + sorted({a.name for r in reports for a in r.loaded} - set(wanted))
    return AdapterListing(
        enabled=settings.lora_slots > 0,
        slots=settings.lora_slots,
        max_rank=settings.lora_max_rank,
        max_per_request=settings.lora_max_per_request,
        targets=settings.lora_targets,
        workers=len(reports),
        adapters=[describe(name, wanted.get(name), name in wanted, reports) for name in names],
    )


@router.get(
    "",
    response_model=AdapterListing,
    responses=ERROR_RESPONSES,
    summary="The LoRA adapters served: rank, target layers, where each is loaded",
)
async def list_loras(_caller: Caller, settings: SettingsDep, registry: AdaptersDep) -> AdapterListing:
    return await listing(registry, settings)


@router.post(
    "",
    response_model=AdapterInfo,
    responses={
        **ERROR_RESPONSES,
        202: {"model": AdapterInfo, "description": "Accepted; the workers are still loading it"},
    },
    summary="Load an adapter on every worker (operators: ADMIN_API_KEYS)",
    description="The source is a name in the workers' `LORA_DIR` (default: `name`) or a hub id of "
    "`LORA_HUB_IDS`. Answers 200 once every worker reports it loaded, 202 while they load it (after "
    "`LORA_LOAD_WAIT_S`, or at once with no worker running), 422 `lora_load_failed` with the worker's "
    "reason (a bad file, a rank above `LORA_MAX_RANK`, layers outside `LORA_TARGETS`, no free slot).",
)
async def load_lora(
    body: LoRALoad, _admin: Admin, settings: SettingsDep, registry: AdaptersDep
) -> AdapterInfo | JSONResponse:
    if settings.lora_slots == 0:
        raise ApiError(409, "loras_disabled", "this deployment serves no LoRA adapters: set LORA_SLOTS first")
    source = body.source or body.name
    try:
        check_source(source, settings.lora_allowed_hub_ids)
    except SourceNotAllowed as error:
        raise ApiError(422, "lora_source_not_allowed", str(error), field="source") from None
    existing = await registry.want(body.name, source)
    if existing is not None:
        raise ApiError(
            409,
            "lora_exists",
            f"adapter {body.name!r} is already served from {existing!r}; unload it first "
            f"(DELETE /v1/loras/{body.name}) or choose another name",
            field="name",
        )
    deadline = time.monotonic() + settings.lora_load_wait_s
    while True:
        reports = await registry.reports()
        info = describe(body.name, source, True, reports)
        if info.status == "failed":
            await registry.drop(body.name)  # not served, and a later request may try again
            raise ApiError(
                422,
                "lora_load_failed",
                f"a worker could not load {body.name!r}: {info.error}",
                field="source",
            )
        if info.status == "loaded":
            return info
        if not reports or time.monotonic() >= deadline:
            return JSONResponse(info.model_dump(mode="json"), status_code=202)
        await asyncio.sleep(POLL_S)


@router.delete(
    "/{name}",
    response_model=AdapterInfo,
    responses=ERROR_RESPONSES,
    summary="Stop serving an adapter (operators: ADMIN_API_KEYS)",
    description="Requests naming it are refused from now on; each worker frees its slot once no running "
    "job uses it (`unloading` until then). A queued job that names it fails on its worker.",
)
async def unload_lora(name: str, _admin: Admin, settings: SettingsDep, registry: AdaptersDep) -> AdapterInfo:
    wanted = await registry.wanted()
    if name not in wanted or not await registry.drop(name):
        raise ApiError(404, "lora_not_found", f"no adapter {name!r} is served (GET /v1/loras)", field="name")
    return describe(name, wanted[name], False, await registry.reports())
