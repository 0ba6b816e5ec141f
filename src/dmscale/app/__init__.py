"""The application: command line, run configs and directories, reports, datasets, demo model zoo."""
