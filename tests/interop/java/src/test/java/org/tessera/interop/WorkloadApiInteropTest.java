package org.tessera.interop;

import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.spiffe.bundle.jwtbundle.JwtBundle;
import io.spiffe.bundle.jwtbundle.JwtBundleSet;
import io.spiffe.bundle.x509bundle.X509Bundle;
import io.spiffe.bundle.x509bundle.X509BundleSet;
import io.spiffe.exception.JwtSvidException;
import io.spiffe.spiffeid.SpiffeId;
import io.spiffe.spiffeid.TrustDomain;
import io.spiffe.svid.jwtsvid.JwtSvid;
import io.spiffe.svid.x509svid.X509Svid;
import io.spiffe.svid.x509svid.X509SvidValidator;
import io.spiffe.workloadapi.DefaultWorkloadApiClient;
import io.spiffe.workloadapi.Watcher;
import io.spiffe.workloadapi.WorkloadApiClient;
import io.spiffe.workloadapi.X509Context;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;

import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.security.PublicKey;
import java.security.Signature;
import java.security.cert.X509Certificate;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.Collection;
import java.util.Collections;
import java.util.Date;
import java.util.List;
import java.util.Set;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

/**
 * java-spiffe's DefaultWorkloadApiClient against a live Tessera agent.
 */
class WorkloadApiInteropTest {
    static final String AUDIENCE = "interop-aud";
    static final String HINT = "interop";

    private WorkloadApiClient client;

    @BeforeEach
    void open() throws Exception {
        client = Env.newClient();
    }

    @AfterEach
    void close() throws Exception {
        if (client != null) {
            client.close();
        }
    }

    // ---- X.509 ----

    @Test
    void fetchX509ContextReturnsDefaultSvidForCallerAndBundle() throws Exception {
        X509Context ctx = client.fetchX509Context();
        assertNotNull(ctx);
        assertFalse(ctx.getX509Svids().isEmpty(), "no X509-SVIDs");

        X509Svid svid = ctx.getDefaultSvid();
        assertEquals(Env.expectedId(), svid.getSpiffeId(), "default SVID SPIFFE ID");
        assertEquals(HINT, svid.getHint(), "hint configured on the entry");
        assertFalse(svid.getChain().isEmpty(), "chain empty");
        assertNotNull(svid.getPrivateKey(), "no private key");

        X509Certificate leaf = svid.getLeaf();
        assertEquals(List.of(Env.expectedId().toString()), uriSans(leaf), "leaf URI SANs");
        leaf.checkValidity();

        // The private key belongs to the leaf.
        assertKeyPair(svid.getPrivateKey(), leaf.getPublicKey());

        X509Bundle bundle = ctx.getX509BundleSet().getBundleForTrustDomain(Env.trustDomain());
        assertEquals(Env.trustDomain(), bundle.getTrustDomain());
        assertFalse(bundle.getX509Authorities().isEmpty(), "bundle has no X.509 authorities");

        // The chain verifies against the bundle (java-spiffe's own PKIX check).
        X509SvidValidator.verifyChain(svid.getChain(), ctx.getX509BundleSet());
        X509SvidValidator.verifySpiffeId(leaf, () -> Set.of(Env.expectedId()));
    }

    @Test
    void defaultClientReadsSpiffeEndpointSocketFromEnvironment() throws Exception {
        try (WorkloadApiClient envClient = DefaultWorkloadApiClient.newClient()) {
            X509Context ctx = envClient.fetchX509Context();
            assertEquals(Env.expectedId(), ctx.getDefaultSvid().getSpiffeId());
        }
    }

    @Test
    void fetchX509BundlesContainsTrustDomainAuthorities() throws Exception {
        X509BundleSet bundles = client.fetchX509Bundles();
        X509Bundle bundle = bundles.getBundleForTrustDomain(Env.trustDomain());
        assertEquals(Env.trustDomain(), bundle.getTrustDomain());
        assertFalse(bundle.getX509Authorities().isEmpty(), "bundle has no X.509 authorities");
        for (X509Certificate ca : bundle.getX509Authorities()) {
            assertTrue(ca.getBasicConstraints() >= 0, "authority is not a CA: " + ca.getSubjectX500Principal());
        }

        // Same authorities as the bundle delivered alongside the SVID, and the SVID chains to them.
        X509Context ctx = client.fetchX509Context();
        assertEquals(bundle.getX509Authorities(),
                ctx.getX509BundleSet().getBundleForTrustDomain(Env.trustDomain()).getX509Authorities());
        X509SvidValidator.verifyChain(ctx.getDefaultSvid().getChain(), bundles);
    }

    @Test
    @Timeout(30)
    void watchX509ContextObservesRotation() throws Exception {
        BlockingQueue<Object> updates = new LinkedBlockingQueue<>();
        client.watchX509Context(new Watcher<X509Context>() {
            @Override
            public void onUpdate(X509Context update) {
                updates.add(update);
            }

            @Override
            public void onError(Throwable e) {
                updates.add(e);
            }
        });

        X509Context first = next(updates, Duration.ofSeconds(5));
        assertEquals(Env.expectedId(), first.getDefaultSvid().getSpiffeId());
        BigInteger firstSerial = first.getDefaultSvid().getLeaf().getSerialNumber();

        Instant deadline = Instant.now().plusSeconds(10);
        X509Context rotated = null;
        while (Instant.now().isBefore(deadline)) {
            X509Context u = next(updates, Duration.between(Instant.now(), deadline));
            if (!u.getDefaultSvid().getLeaf().getSerialNumber().equals(firstSerial)) {
                rotated = u;
                break;
            }
        }
        assertNotNull(rotated, "no rotated X509-SVID (new serial) within 10 s of the first update");
        X509Svid svid = rotated.getDefaultSvid();
        assertEquals(Env.expectedId(), svid.getSpiffeId());
        assertNotEquals(firstSerial, svid.getLeaf().getSerialNumber());
        assertKeyPair(svid.getPrivateKey(), svid.getLeaf().getPublicKey());
        X509SvidValidator.verifyChain(svid.getChain(), rotated.getX509BundleSet());
        svid.getLeaf().checkValidity();
    }

    // ---- JWT ----

    @Test
    void fetchJwtBundlesContainsTrustDomainKeys() throws Exception {
        JwtBundleSet bundles = client.fetchJwtBundles();
        JwtBundle bundle = bundles.getBundleForTrustDomain(Env.trustDomain());
        assertEquals(Env.trustDomain(), bundle.getTrustDomain());
        assertFalse(bundle.getJwtAuthorities().isEmpty(), "JWT bundle has no authorities");
        bundle.getJwtAuthorities().forEach((kid, key) -> {
            assertFalse(kid.isBlank(), "blank key id");
            assertNotNull(key, "null key for kid " + kid);
        });
    }

    @Test
    void fetchJwtSvidForAudience() throws Exception {
        JwtSvid svid = client.fetchJwtSvid(AUDIENCE);
        assertEquals(Env.expectedId(), svid.getSpiffeId());
        assertEquals(Set.of(AUDIENCE), svid.getAudience());
        assertEquals(HINT, svid.getHint(), "hint configured on the entry");
        assertEquals(Env.expectedId().toString(), svid.getClaims().get("sub"));
        assertTrue(svid.getExpiry().after(new Date()), "already expired: " + svid.getExpiry());
        assertTrue(svid.getExpiry().before(Date.from(Instant.now().plus(Duration.ofMinutes(3)))),
                "expiry too far in the future for a 2m TTL: " + svid.getExpiry());

        // Asking for our own SPIFFE ID explicitly works too.
        JwtSvid bySubject = client.fetchJwtSvid(Env.expectedId(), AUDIENCE, "interop-aud-2");
        assertEquals(Env.expectedId(), bySubject.getSpiffeId());
        assertEquals(Set.of(AUDIENCE, "interop-aud-2"), bySubject.getAudience());
    }

    @Test
    void fetchJwtSvidForForeignSubjectFails() {
        SpiffeId other = SpiffeId.parse("spiffe://example.org/not-this-workload");
        JwtSvidException e = assertThrows(JwtSvidException.class, () -> client.fetchJwtSvid(other, AUDIENCE));
        Status status = grpcStatus(e);
        assertNotNull(status, "expected a gRPC error from the agent, got " + e);
        // What the Workload API spec (and SPIRE) answer when the caller is not
        // entitled to the requested identity.
        assertEquals(Status.Code.PERMISSION_DENIED, status.getCode(), "agent status: " + status);
    }

    @Test
    void validateJwtSvidThroughAgent() throws Exception {
        JwtSvid svid = client.fetchJwtSvid(AUDIENCE);
        JwtSvid validated = client.validateJwtSvid(svid.getToken(), AUDIENCE);
        assertEquals(Env.expectedId(), validated.getSpiffeId());
        assertTrue(validated.getAudience().contains(AUDIENCE));
    }

    @Test
    void validateJwtSvidThroughAgentRejectsWrongAudience() throws Exception {
        JwtSvid svid = client.fetchJwtSvid(AUDIENCE);
        JwtSvidException e = assertThrows(JwtSvidException.class,
                () -> client.validateJwtSvid(svid.getToken(), "some-other-audience"));
        // The rejection must come from the agent (gRPC InvalidArgument, per the
        // SPIFFE Workload API), not from java-spiffe's local re-parse.
        Status status = grpcStatus(e);
        assertNotNull(status, "expected the agent to reject the token, got " + e);
        assertEquals(Status.Code.INVALID_ARGUMENT, status.getCode(), "agent status: " + status);
    }

    @Test
    void validateJwtSvidThroughAgentRejectsTamperedToken() throws Exception {
        JwtSvid svid = client.fetchJwtSvid(AUDIENCE);
        String token = svid.getToken();
        String[] parts = token.split("\\.");
        assertEquals(3, parts.length, "compact JWS");
        // Flip one character of the signature.
        char[] sig = parts[2].toCharArray();
        sig[sig.length / 2] = sig[sig.length / 2] == 'A' ? 'B' : 'A';
        String tampered = parts[0] + "." + parts[1] + "." + new String(sig);
        JwtSvidException e = assertThrows(JwtSvidException.class, () -> client.validateJwtSvid(tampered, AUDIENCE));
        Status status = grpcStatus(e);
        assertNotNull(status, "expected the agent to reject the token, got " + e);
        assertEquals(Status.Code.INVALID_ARGUMENT, status.getCode(), "agent status: " + status);
    }

    @Test
    void jwtSvidValidatesOfflineAgainstFetchedBundles() throws Exception {
        JwtSvid svid = client.fetchJwtSvid(AUDIENCE);
        JwtBundleSet bundles = client.fetchJwtBundles();

        JwtSvid parsed = JwtSvid.parseAndValidate(svid.getToken(), bundles, Collections.singleton(AUDIENCE));
        assertEquals(Env.expectedId(), parsed.getSpiffeId());
        assertEquals(Set.of(AUDIENCE), parsed.getAudience());
        assertEquals(svid.getToken(), parsed.marshal());

        assertThrows(JwtSvidException.class, () -> JwtSvid.parseAndValidate(
                svid.getToken(), bundles, Collections.singleton("some-other-audience")));

        // A bundle set for another trust domain cannot validate it.
        JwtBundleSet foreign = JwtBundleSet.of(List.of(new JwtBundle(TrustDomain.parse("other.example"))));
        assertThrows(Exception.class, () -> JwtSvid.parseAndValidate(
                svid.getToken(), foreign, Collections.singleton(AUDIENCE)));
    }

    // ---- helpers ----

    @SuppressWarnings("unchecked")
    static <T> T next(BlockingQueue<Object> q, Duration timeout) throws InterruptedException {
        Object o = q.poll(Math.max(1, timeout.toMillis()), TimeUnit.MILLISECONDS);
        if (o == null) {
            fail("no watch update within " + timeout);
        }
        if (o instanceof Throwable) {
            fail("watch reported an error", (Throwable) o);
        }
        return (T) o;
    }

    static List<String> uriSans(X509Certificate cert) throws Exception {
        List<String> uris = new ArrayList<>();
        Collection<List<?>> sans = cert.getSubjectAlternativeNames();
        if (sans != null) {
            for (List<?> san : sans) {
                if (((Integer) san.get(0)) == 6) {
                    uris.add((String) san.get(1));
                }
            }
        }
        return uris;
    }

    static void assertKeyPair(java.security.PrivateKey priv, PublicKey pub) throws Exception {
        String alg;
        switch (priv.getAlgorithm()) {
            case "EC":
                alg = "SHA256withECDSA";
                break;
            case "RSA":
                alg = "SHA256withRSA";
                break;
            case "Ed25519":
            case "EdDSA":
                alg = "Ed25519";
                break;
            default:
                throw new AssertionError("unexpected key algorithm " + priv.getAlgorithm());
        }
        byte[] msg = "tessera-interop".getBytes(StandardCharsets.UTF_8);
        Signature s = Signature.getInstance(alg);
        s.initSign(priv);
        s.update(msg);
        byte[] sig = s.sign();
        Signature v = Signature.getInstance(alg);
        v.initVerify(pub);
        v.update(msg);
        assertTrue(v.verify(sig), "private key does not match the leaf certificate's public key");
    }

    static Status grpcStatus(Throwable t) {
        for (Throwable c = t; c != null; c = c.getCause()) {
            if (c instanceof StatusRuntimeException) {
                return ((StatusRuntimeException) c).getStatus();
            }
        }
        return null;
    }
}
