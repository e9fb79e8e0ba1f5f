"""spotpipe: pipeline-parallel LLM training on machines that fail.

See DESIGN.md in the shared folder for the map of the package; the README for the commands.
"""

__version__ = "0.1.0"
