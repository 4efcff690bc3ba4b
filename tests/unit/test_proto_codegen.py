"""The committed generated protobuf code matches what scripts/gen_proto.py makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_service_has_every_v1_call() -> None:
    from gradmix.proto.v1 import selection_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["SelectionService"]
    assert service.full_name == "gradmix.v1.SelectionService"
    assert set(service.methods_by_name) == {
        "CreateJob", "GetJob", "ListJobs", "RegisterTask", "ListTasks", "DeclareAnchor",
        "CompleteAnchor", "ListAnchors", "CommitSketch", "UploadSketch", "GetMixture",
        "WatchMixture", "ListMixtures", "EstimateSubsets", "SelectTasks", "GetServerInfo",
        "ReportTaskFailure", "UpdateTask", "PinMixture", "UnpinMixture", "DeleteJob",
        "UnarchiveJob", "ListJobEvents"}
