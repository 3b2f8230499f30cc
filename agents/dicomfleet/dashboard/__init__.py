"""The fleet dashboard: heartbeats from the agents, the fleet and machine pages, metrics.

Importing this package loads no web framework; ``dashboard.app`` does.
"""
