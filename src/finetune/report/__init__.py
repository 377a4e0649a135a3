"""report.html: a run's config, metrics and pictures in one offline page."""
