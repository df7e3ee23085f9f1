"""The ``adaptrain`` command: YAML configs -> validated objects -> a run folder -> a verb."""
