# The aws target: the newest official Debian 12 AMI, provisioned by the same
# playbook, registered as an encrypted AMI that requires IMDSv2.
# Needs modern Packer with the amazon plugin (see plugins.pkr.hcl).
source "amazon-ebs" "aws" {
  region        = var.aws_region
  instance_type = local.builder_instance_type
  subnet_id     = var.aws_subnet_id != "" ? var.aws_subnet_id : null

  source_ami_filter {
    filters = {
      name                = local.source_ami_name
      architecture        = var.architecture == "arm64" ? "arm64" : "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    # Debian's cloud team publishes the official images from this account.
    owners      = ["136693071363"]
    most_recent = true
  }

  ami_name        = local.name
  ami_description = "nightshift job runner for ${var.project}/${var.job} (${var.git_revision})"

  launch_block_device_mappings {
    device_name = "/dev/xvda"
    volume_size = var.root_volume_gb
    volume_type = "gp3"
    # gp3's free baseline, stated: some amazon-ebs versions reject gp3 without it.
    iops                  = 3000
    throughput            = 125
    encrypted             = true
    delete_on_termination = true
  }

  # IMDSv2 only, on the build instance and on every instance of the AMI.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  imds_support = "v2.0"

  communicator = "ssh"
  ssh_username = "admin"
  # Packer's temporary key must not outlive the bake in the AMI.
  ssh_clear_authorized_keys = true
  temporary_key_pair_type   = "ed25519"

  # {{ .SourceAMI }} is filled in by the builder once the filter resolved.
  tags = merge(local.tags, {
    "nightshift:source-image"      = "{{ .SourceAMI }}"
    "nightshift:source-image-name" = "{{ .SourceAMIName }}"
  })
  snapshot_tags = local.tags
  run_tags      = local.tags
}
