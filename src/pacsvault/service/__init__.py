"""Running pacsvault as a system service: one server per vault (``lock``), ports checked
before anything starts (``ports``), where the data lives (``sysconfig``) and the systemd
installation (``install``, with the shipped ``pacsvault.service`` unit)."""
