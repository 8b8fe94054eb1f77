"""worknode services and the ``worknode`` command line."""
