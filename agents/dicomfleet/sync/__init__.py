"""The sync: follow one Orthanc server's change feed into MongoDB's ``studies`` collection.

Entry point ``dicomfleet sync`` (``service.main``); ``dicomfleet sync reconcile`` compares both sides.
"""
