"""Subjects: `POST /subjects` stores a photo once, `/customize` and `/jobs` reuse it by `subject_id`
(its reference tokens are computed by the first worker that needs them, then shared);
`GET /subjects/{id}`, `DELETE /subjects/{id}`.

A subject belongs to the caller that uploaded it (its API key; its address when the API is open):
for any other caller it does not exist (404).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from service.api import results
from service.api.deps import RateLimitedCaller, SettingsDep, SubjectsDep, owner_of, tier_of
from service.api.intake import Intake
from service.api.openapi import ERROR_RESPONSES
from service.queue.protocol import QueueFullError
from service.schemas import SubjectInfo, SubjectUpload
from service.subjects.resolve import find_subject, info, new_subject, not_found

router = APIRouter(prefix="/subjects", tags=["subjects"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SubjectUpload.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SubjectInfo,
    responses=ERROR_RESPONSES,
    openapi_extra=UPLOAD_BODY,
    summary="Store a subject photo once; pass its id as `subject_id` instead of the image",
    description="The same photo (after decoding) from the same caller always gets the same id; "
    "uploading it again keeps it for another `SUBJECT_TTL_S`. Counted against the queue's byte budget, "
    "the subject budget and the key's share of it (429 `queue_full`, `subjects_full`, `key_subjects_full`).",
)
async def create_subject(
    request: Request, caller: RateLimitedCaller, settings: SettingsDep, subjects: SubjectsDep
) -> SubjectInfo:
    intake: Intake = request.app.state.intake
    owner = owner_of(caller)
    image = await intake.decode_subject(request, owner)
    tier = tier_of(caller, settings)
    try:
        stored = await subjects.put(new_subject(image, owner, settings.reference_version, tier))
    except QueueFullError as error:
        raise results.refusal(error, tier) from None
    return info(stored)


@router.get(
    "/{subject_id}", response_model=SubjectInfo, responses=ERROR_RESPONSES, summary="A stored subject"
)
async def get_subject(caller: RateLimitedCaller, subject_id: str, subjects: SubjectsDep) -> SubjectInfo:
    return info(await find_subject(subjects, owner_of(caller), subject_id))


@router.delete(
    "/{subject_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=ERROR_RESPONSES,
    summary="Delete a stored subject and its cached tokens",
)
async def delete_subject(caller: RateLimitedCaller, subject_id: str, subjects: SubjectsDep) -> Response:
    await find_subject(subjects, owner_of(caller), subject_id)
    if not await subjects.delete(subject_id):
        raise not_found(subject_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
