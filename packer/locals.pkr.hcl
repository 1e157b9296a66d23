# Names and provenance shared by both sources.
locals {
  # One timestamp for the whole build, so the name and the tags agree.
  build_time = timestamp()
  stamp      = formatdate("YYYYMMDDhhmmss", local.build_time)
  name       = "${var.project}-${var.job}-${local.stamp}"

  output_directory = "${var.build_dir}/images/${local.name}"
  console_log      = "${var.build_dir}/logs/${local.name}.console.log"

  # Where each source's image comes from, and the registry its unit pulls from.
  source_image = {
    local = "debian-12-base:${var.base_key}"
    aws   = "debian-12-${var.architecture} (owner 136693071363, newest)"
  }
  registry = {
    local = "10.0.2.2:${var.registry_port}"
    aws   = var.aws_registry
  }

  # The official Debian AMIs are named debian-12-<arch>-<date>-<build>.
  source_ami_name       = "debian-12-${var.architecture}-*"
  builder_instance_type = var.aws_builder_instance_type != "" ? var.aws_builder_instance_type : (var.architecture == "arm64" ? "t4g.small" : "t3.small")

  # The launcher selects images by the first two keys; keep them in step
  # with lambda/launcher.py.
  tags = {
    "Name"                    = local.name
    "nightshift:project"      = var.project
    "nightshift:job"          = var.job
    "nightshift:build-time"   = local.build_time
    "nightshift:git-revision" = var.git_revision
  }
}
