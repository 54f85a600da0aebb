"""banger: disposable Linux microVMs on your own Linux host, fast."""

__version__ = "0.1.0"
