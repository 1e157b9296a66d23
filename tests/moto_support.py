"""What the moto-backed tests share: clients, and a baked image as the bake tags it.

The EC2 API cannot set an image's creation date, state or owner, so these
are set on moto's backend after registering, as a real bake would leave them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import boto3
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

REGION = "eu-west-1"
PROJECT = "nightshift"
JOB = "example"


def ec2_backend(region: str = REGION):
    return ec2_backends[DEFAULT_ACCOUNT_ID][region]


def tagged_image(
    ec2,
    name: str,
    *,
    project: str = PROJECT,
    job: str = JOB,
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


class MotoAws:
    """Clients against one moto (server or mock_aws), and a hand into EC2's.

    A subclass names the services its tests talk to in SERVICES; each becomes
    an attribute holding its client.
    """

    SERVICES: tuple[str, ...] = ("ec2",)

    def __init__(self, endpoint: str | None = None):
        self.endpoint = endpoint
        for name in self.SERVICES:
            client = boto3.client(name, region_name=REGION, endpoint_url=endpoint)
            setattr(self, name, client)

    @property
    def backend(self):
        return ec2_backend(REGION)

    def image(
        self,
        created: str,
        *,
        project: str = PROJECT,
        job: str = JOB,
        state: str = "available",
        owner: str | None = None,
    ) -> str:
        """An image as the bake tags it, with its date, state and owner."""
        return tagged_image(
            self.ec2, f"{project}-{job}-{created}", project=project, job=job,
            created=created, state=state, owner=owner,
        )  # fmt: skip

    def template(self, name: str = f"{PROJECT}-{JOB}", **data: Any) -> str:
        return self.ec2.create_launch_template(
            LaunchTemplateName=name,
            LaunchTemplateData={"InstanceType": "t3.micro", **data},
        )["LaunchTemplate"]["LaunchTemplateId"]
