"""What the moto-backed tests share: a baked image as the bake tags it.

The EC2 API cannot set an image's creation date, state or owner, so these
are set on moto's backend after registering, as a real bake would leave them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

REGION = "eu-west-1"


def ec2_backend(region: str = REGION):
    return ec2_backends[DEFAULT_ACCOUNT_ID][region]


def tagged_image(
    ec2,
    name: str,
    *,
    project: str = "nightshift",
    job: str = "example",
    created: str | None = None,
    state: str | None = None,
    owner: str | None = None,
) -> str:
    """Register an image tagged for project and job; set what the API cannot."""
    image_id = ec2.register_image(
        Name=name,
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8}}],
    )["ImageId"]
    ec2.create_tags(
        Resources=[image_id],
        Tags=[
            {"Key": "nightshift:project", "Value": project},
            {"Key": "nightshift:job", "Value": job},
        ],
    )
    ami = ec2_backend(ec2.meta.region_name).amis[image_id]
    if created:
        ami.creation_date = datetime.fromisoformat(created).replace(tzinfo=UTC)
    if state:
        ami.state = state
    if owner:
        ami.owner_id = owner
    return image_id
