"""Which machine image a run boots: one rule for local images and for AMIs.

The launcher Lambda and the local runner both call newest_image(), so a
local run picks its disk image exactly as the Lambda picks an AMI: the newest
created, of this project and job, complete.  Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Candidate:
    """A machine image as both targets describe it."""

    image_id: str
    created: datetime
    project: str
    job: str
    complete: bool
    owner: str = "self"


class NoImageError(LookupError):
    """No image qualifies; the message names the filters used."""


def newest_image(candidates: list[Candidate], *, project: str, job: str) -> Candidate:
    """The newest complete image tagged for this project and job."""
    qualifying = [
        image
        for image in candidates
        if image.complete
        and image.owner == "self"
        and image.project == project
        and image.job == job
    ]
    if not qualifying:
        raise NoImageError(
            f"no image qualifies: owner=self, project={project}, job={job}, "
            f"complete (available); looked at {len(candidates)} image(s)"
        )
    return max(qualifying, key=lambda image: (image.created, image.image_id))
