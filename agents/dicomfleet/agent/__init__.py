"""The dicomfleet agent: watch imaging machines' export folders and send each DICOM file to Orthanc.

``dicomfleet agent --config PATH`` runs ``dicomfleet.agent.service.main``.
"""
