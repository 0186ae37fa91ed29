"""All tables. Importing this package registers every model on ``SQLModel.metadata``.

One module per area, so each area's tables evolve in its own file and Alembic revision.
"""

from connector.storage.models import connections as connections
from connector.storage.models import events as events
from connector.storage.models import ops as ops
from connector.storage.models import payments as payments
