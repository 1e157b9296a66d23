# Inputs of the bake. `invoke bake-ami` sets them from nightshift.toml after
# checking them itself; the validation blocks catch a wrong value given to
# packer directly, before any VM or instance starts. A full match is written
# as "regex_replace leaves nothing": Packer 1.6.6 has no regex() or can().

variable "project" {
  type        = string
  default     = "nightshift"
  description = "Project name: part of the image name and its nightshift:project tag."

  validation {
    condition     = (length(var.project) > 0 && regex_replace(var.project, "^[a-z0-9][a-z0-9-]{0,62}$", "") == "")
    error_message = "The project variable must be lowercase letters, digits and '-' (at most 63)."
  }
}

variable "job" {
  type        = string
  default     = "example"
  description = "Job name: part of the image name and its nightshift:job tag."

  validation {
    condition     = (length(var.job) > 0 && regex_replace(var.job, "^[a-z0-9][a-z0-9-]{0,62}$", "") == "")
    error_message = "The job variable must be lowercase letters, digits and '-' (at most 63)."
  }
}

variable "git_revision" {
  type        = string
  default     = "unknown"
  description = "Revision of this repository the image is baked from (provenance tag)."
}

variable "warm_image" {
  type        = string
  default     = ""
  description = "Job image to pull into the image at bake time (warm layer cache), as the machine reaches it; empty: none."
}

variable "inputs_key" {
  type        = string
  default     = ""
  description = "Hash of everything the bake reads (template, playbook, roles, agent, base); a later bake with the same key reuses this image."
}

variable "build_dir" {
  type        = string
  default     = "build"
  description = "Folder for build output: images/<name>/, logs/ and manifest.json."
}

variable "playbook_file" {
  type        = string
  default     = "ansible/playbook.yml"
  description = "Playbook the ansible provisioner runs, relative to the repository root."
}

variable "architecture" {
  type        = string
  default     = "amd64"
  description = "CPU architecture of the image: amd64 or arm64 (the local target is amd64 only)."

  validation {
    condition     = contains(["amd64", "arm64"], var.architecture)
    error_message = "The architecture variable must be one of: amd64, arm64."
  }
}

# --- local target (qemu) ---

variable "accelerator" {
  type        = string
  default     = "tcg"
  description = "qemu accelerator for the local bake: tcg (works everywhere) or kvm."

  validation {
    condition     = contains(["tcg", "kvm"], var.accelerator)
    error_message = "The accelerator variable must be one of: tcg, kvm."
  }
}

variable "base_disk" {
  type        = string
  default     = ""
  description = "The local base disk (qcow2) made by `invoke base-image`."
}

variable "base_kernel" {
  type        = string
  default     = ""
  description = "Kernel of the base disk, booted directly (-kernel)."
}

variable "base_initrd" {
  type        = string
  default     = ""
  description = "Initrd of the base disk, booted directly (-initrd)."
}

variable "base_key" {
  type        = string
  default     = "unknown"
  description = "Input hash of the base disk: the local image's source."
}

variable "ssh_private_key_file" {
  type        = string
  default     = ""
  description = "Private half of the per-build key Packer and Ansible log in with."
}

variable "ssh_public_key_file" {
  type        = string
  default     = ""
  description = "Public half of the per-build key, handed to the VM through qemu's fw_cfg."
}

variable "registry_port" {
  type        = number
  default     = 5000
  description = "Port of the host's local registry; the guest reaches it at 10.0.2.2."

  validation {
    condition     = var.registry_port >= 1024 && var.registry_port <= 65535
    error_message = "The registry_port variable must be a port from 1024 to 65535."
  }
}

variable "memory_mb" {
  type        = number
  default     = 2048
  description = "Memory of the local build VM, in MiB."

  validation {
    condition     = var.memory_mb >= 512
    error_message = "The memory_mb variable must be at least 512."
  }
}

variable "cpus" {
  type        = number
  default     = 2
  description = "vCPUs of the local build VM."

  validation {
    condition     = var.cpus >= 1 && var.cpus <= 64
    error_message = "The cpus variable must be from 1 to 64."
  }
}

# --- aws target (amazon-ebs) ---

variable "aws_region" {
  type        = string
  default     = "eu-west-1"
  description = "Region the AMI is built and registered in."

  validation {
    condition     = (length(var.aws_region) > 0 && regex_replace(var.aws_region, "^[a-z]{2}(-[a-z]+)+-[0-9]$", "") == "")
    error_message = "The aws_region variable must be a region name like eu-west-1."
  }
}

variable "aws_registry" {
  type        = string
  default     = ""
  description = "ECR registry host the job image comes from: ACCOUNT.dkr.ecr.REGION.amazonaws.com."

  validation {
    condition     = var.aws_registry == "" || (length(var.aws_registry) > 0 && regex_replace(var.aws_registry, "^[0-9]{12}\\.dkr\\.ecr\\.[a-z0-9-]+\\.amazonaws\\.com$", "") == "")
    error_message = "The aws_registry variable must be ACCOUNT.dkr.ecr.REGION.amazonaws.com (12-digit account)."
  }
}

variable "aws_builder_instance_type" {
  type        = string
  default     = ""
  description = "Instance type of the build instance; empty picks t3.small (amd64) or t4g.small (arm64)."

  validation {
    condition     = var.aws_builder_instance_type == "" || (length(var.aws_builder_instance_type) > 0 && regex_replace(var.aws_builder_instance_type, "^[a-z][a-z0-9-]*[0-9][a-z0-9-]*\\.[0-9]*[a-z]+[0-9]*$", "") == "")
    error_message = "The aws_builder_instance_type variable must be an instance type like t3.small."
  }
}

variable "aws_subnet_id" {
  type        = string
  default     = ""
  description = "Subnet for the build instance; empty uses the default VPC."
}

variable "root_volume_gb" {
  type        = number
  default     = 30
  description = "Size of the AMI's root volume in GiB (Docker's layers and the job live there)."

  validation {
    condition     = var.root_volume_gb >= 8 && var.root_volume_gb <= 16384
    error_message = "The root_volume_gb variable must be from 8 to 16384."
  }
}
