"""Roll out dicomfleet to the hosts of one inventory with pyinfra.

Run ``dicomfleet deploy INVENTORY``: it validates the inventory, builds the
wheelhouse, then runs
``DICOMFLEET_INVENTORY=INVENTORY pyinfra -y dicomfleet.pyinfra_inventory.hosts deploy.py``.
"""

import os
from pathlib import Path

from pyinfra import host

from dicomfleet import credentials, render
from dicomfleet.inventory import load_site
from dicomfleet.pyinfra_deploy import apply_plan
from dicomfleet.pyinfra_inventory import INVENTORY_VARIABLE
from dicomfleet.wheelhouse import default_wheelhouse

site = load_site(os.environ[INVENTORY_VARIABLE])
plan = render.plan_host(site, host.data.dicomfleet_host, credentials.ensure_secrets(site))
wheelhouse = Path(os.environ.get("DICOMFLEET_WHEELHOUSE") or default_wheelhouse())

apply_plan(plan, wheelhouse)
