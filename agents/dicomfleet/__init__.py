"""dicomfleet: carry every image of a hospital's imaging machines to Orthanc and MongoDB."""

__version__ = "0.1.0"
