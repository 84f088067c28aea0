"""The base type of the errors a user can fix, and their one-line form.

Every command-line tool catches ``UserError`` at its top and exits with
``error: <message>`` on one line and status 1, never a traceback.
"""


class UserError(Exception):
  """An error in the user's input or setup; its message says what to do."""


def first_line(error: Exception) -> str:
  """The first line of ``error``'s message, or its type's name if empty.

  For wrapping an error raised by a library, whose message may run over many
  lines, into a one-line ``UserError``.
  """
  text = str(error).strip()
  return text.splitlines()[0].rstrip() if text else type(error).__name__
