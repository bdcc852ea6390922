package org.tessera.interop;

import io.spiffe.spiffeid.SpiffeId;
import io.spiffe.spiffeid.TrustDomain;
import io.spiffe.workloadapi.DefaultWorkloadApiClient;
import io.spiffe.workloadapi.WorkloadApiClient;

/**
 * The values that tests/interop/agent.sh exports for the command it runs.
 */
final class Env {
    private Env() {
    }

    static String require(String name) {
        String value = System.getenv(name);
        if (value == null || value.isBlank()) {
            throw new IllegalStateException(name + " is not set: run this suite through tests/interop/agent.sh "
                    + "(see tests/interop/java/run.sh)");
        }
        return value;
    }

    /**
     * The Workload API address as java-spiffe wants it. agent.sh exports the
     * SPIFFE form unix:///abs/path, which java-spiffe's Address.parseAddress
     * accepts as is; the rarer unix:/abs/path form is accepted too, so both
     * are passed through unchanged (a bare path is turned into unix://PATH).
     */
    static String socket() {
        String raw = require("SPIFFE_ENDPOINT_SOCKET");
        if (raw.startsWith("/")) {
            return "unix://" + raw;
        }
        return raw;
    }

    static SpiffeId expectedId() {
        return SpiffeId.parse(require("TESSERA_EXPECTED_ID"));
    }

    static TrustDomain trustDomain() {
        return TrustDomain.parse(require("TESSERA_TRUST_DOMAIN"));
    }

    static WorkloadApiClient newClient() throws Exception {
        return DefaultWorkloadApiClient.newClient(
                DefaultWorkloadApiClient.ClientOptions.builder().spiffeSocketPath(socket()).build());
    }
}
