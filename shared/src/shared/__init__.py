"""Code that the gateway and the worker share: settings, events, Redis key names, the event log."""
