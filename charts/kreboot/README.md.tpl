# kreboot Helm chart

Installs kreboot, the Kubernetes node reboot daemon: one agent per Linux node that reboots its
node safely after the host installs updates that need a reboot (see the project README).

```sh
kubectl create namespace kreboot
kubectl label namespace kreboot pod-security.kubernetes.io/enforce=privileged
helm install kreboot charts/kreboot --namespace kreboot
```

The agent needs `hostPID` and three capabilities, which the `privileged` Pod Security level
allows (or set `namespace.create=true` to let the chart create the namespace with its labels).
Requires Kubernetes ≥ 1.30 (ValidatingAdmissionPolicy v1 and node names in service-account
tokens). `manifests/` in the repository is this chart rendered with its defaults.

## Values

Generated from `values.yaml` by `scripts/check_chart.py --write`; `values.schema.json` rejects
unknown keys and bad values.

{{VALUES_TABLE}}
