"""A config with a syntax error, for the CLI error tests."""

def get_config(:
  pass
