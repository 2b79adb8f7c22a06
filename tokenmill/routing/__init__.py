"""L3: the router as a service: route policies over endpoint clients (round robin, the KV
router adapter), the KV event feed, replica sync, the standalone router service and its
client. Used by the frontend and by ``tokenmill router``; imports no HTTP code."""
