"""`GET /`: the demo page (static HTML/JS/CSS, no build step) that queues jobs with `POST /jobs`
and shows their live progress (`GET /jobs/{id}/events`).

The page learns the request limits from `GET /demo/config.json`, so its controls match what the
API accepts; everything else (validation, error messages) is the real API's.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.api.deps import SettingsDep
from service.errors import ApiError

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
# The only files served: a fixed list, so no request path can reach another file.
ASSETS = {"demo.js": "text/javascript", "demo.css": "text/css"}


@router.get("/")
async def demo_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/demo/config.json")
async def demo_config(settings: SettingsDep) -> dict:
    return {
        "min_side": settings.min_side,
        "max_side": settings.max_side,
        "max_steps": settings.max_steps,
        "max_num_images": settings.max_num_images,
        "max_subjects": settings.max_subjects,
        "api_key_required": bool(settings.api_keys),
    }


@router.get("/demo/{name}")
async def demo_asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise ApiError(404, "not_found", f"no demo asset {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=ASSETS[name])
