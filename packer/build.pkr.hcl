# One build over both targets: the same playbook makes the local image and
# the AMI. `invoke bake-ami --target local|aws` picks one with -only.
build {
  sources = [
    "source.qemu.local",
    "source.amazon-ebs.aws",
  ]

  provisioner "ansible" {
    playbook_file = var.playbook_file
    # Connect straight to the guest's sshd; the proxy adds a hop and breaks
    # Ansible's pipelining.
    use_proxy = false
    user      = source.name == "aws" ? "admin" : "root"

    extra_arguments = [
      "--extra-vars",
      jsonencode({
        nightshift_target            = source.name
        nightshift_project           = var.project
        nightshift_job               = var.job
        nightshift_registry          = local.registry[source.name]
        nightshift_registry_insecure = source.name == "local"
        nightshift_boot_dir          = abspath(local.output_directory)
        nightshift_warm_image        = var.warm_image
      }),
    ]
    ansible_env_vars = [
      "ANSIBLE_CONFIG=ansible/ansible.cfg",
      "ANSIBLE_HOST_KEY_CHECKING=False",
    ]
  }

  post-processor "manifest" {
    output     = "${var.build_dir}/images/manifest.json"
    strip_path = false
    custom_data = {
      name         = local.name
      created      = local.build_time
      source       = local.source_image[source.name]
      git_revision = var.git_revision
      inputs_key   = var.inputs_key
      registry     = local.registry[source.name]
      target       = source.name
      project      = var.project
      job          = var.job
    }
  }
}
