"""The API's side of subjects: a request's `subject_id`s looked up for its owner, new subjects made."""

from __future__ import annotations

from PIL import Image

from service.errors import ApiError
from service.schemas import CustomizeRequest, SubjectInfo
from service.settings import DEFAULT_TIER
from service.subjects.ids import feature_key, subject_id
from service.subjects.store import Subject, SubjectStore


def not_found(subject: str, field: str | None = None) -> ApiError:
    return ApiError(
        404,
        "subject_not_found",
        f"no subject {subject} of yours: it expired, was deleted, or was uploaded with another API key. "
        "Upload the photo again with POST /subjects (the same photo gets the same id), or send it as "
        "`image`.",
        field=field,
    )


async def find_subject(store: SubjectStore, owner: str, subject: str, field: str | None = None) -> Subject:
    """The subject `subject` of `owner`, or the 404 (another owner's subject does not exist for it)."""
    found = await store.get(subject)
    if found is None or found.owner != owner:
        raise not_found(subject, field)
    return found


async def resolve_subjects(request: CustomizeRequest, owner: str, store: SubjectStore) -> dict[str, Subject]:
    """The stored subjects a request names by id, each looked up once."""
    stored: dict[str, Subject] = {}
    for index, subject in enumerate(request.subjects):
        if subject.subject_id is None or subject.subject_id in stored:
            continue
        field = f"subjects[{index}].subject_id"
        stored[subject.subject_id] = await find_subject(store, owner, subject.subject_id, field)
    return stored


def new_subject(image: Image.Image, owner: str, version: str, tier: str = DEFAULT_TIER) -> Subject:
    """A subject of a normalised image, of an owner of key class `tier` (expiry set by the store)."""
    rgb = image.tobytes()
    key = feature_key(rgb, image.width, image.height, version)
    return Subject(subject_id(owner, key), owner, key, image.width, image.height, rgb, 0.0, tier)


def info(subject: Subject) -> SubjectInfo:
    return SubjectInfo(
        id=subject.id, expires_at=subject.expires_at, width=subject.width, height=subject.height
    )
